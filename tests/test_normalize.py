"""Percentile clipping and z-scoring inside the foreground mask."""

from __future__ import annotations

import numpy as np
import pytest

from jule3d.normalize import normalize_intensity
from jule3d.volume import Volume


@pytest.fixture
def masked_volume(specimen_volume: Volume, specimen_truth: np.ndarray) -> Volume:
    data = np.stack([specimen_volume.data[0], specimen_volume.data[0] * 1000.0 - 7.0])
    return Volume(data, specimen_volume.geometry, mask=specimen_truth, channel_names=("a", "b"))


def test_zscore_inside_mask_and_zero_outside(masked_volume: Volume) -> None:
    out = normalize_intensity(masked_volume)
    assert out.data.dtype == np.float32 and out.data.shape == masked_volume.data.shape
    inside = out.data[:, out.mask]
    np.testing.assert_allclose(inside.mean(axis=1), 0.0, atol=1e-5)
    np.testing.assert_allclose(inside.std(axis=1), 1.0, atol=1e-4)
    assert np.all(out.data[:, ~out.mask] == 0)
    np.testing.assert_allclose(out.data[0], out.data[1], atol=1e-4)  # per-channel statistics
    assert out.geometry == masked_volume.geometry and out.channel_names == ("a", "b")


def test_outliers_are_clipped_to_the_percentiles(masked_volume: Volume) -> None:
    data = masked_volume.data.copy()
    z, y, x = np.argwhere(masked_volume.mask)[0]
    data[0, z, y, x] = 1e6
    out = normalize_intensity(Volume(data, masked_volume.geometry, mask=masked_volume.mask), 1.0, 99.0)
    channel = out.data[0][masked_volume.mask]
    assert out.data[0, z, y, x] == channel.max()
    assert channel.max() < 3.0
    assert np.count_nonzero(channel == channel.max()) >= 0.01 * channel.size - 1


def test_background_does_not_change_the_statistics(masked_volume: Volume) -> None:
    data = masked_volume.data.copy()
    data[:, ~masked_volume.mask] = -5000.0
    shifted = normalize_intensity(Volume(data, masked_volume.geometry, mask=masked_volume.mask))
    np.testing.assert_allclose(shifted.data, normalize_intensity(masked_volume).data, atol=1e-5)


def test_without_mask_every_voxel_counts(specimen_volume: Volume) -> None:
    out = normalize_intensity(specimen_volume, lower=0.0, upper=100.0)
    np.testing.assert_allclose(out.data.mean(), 0.0, atol=1e-5)
    np.testing.assert_allclose(out.data.std(), 1.0, atol=1e-4)
    assert out.mask is None


def test_input_is_not_modified(masked_volume: Volume) -> None:
    before = masked_volume.data.copy()
    normalize_intensity(masked_volume)
    np.testing.assert_array_equal(masked_volume.data, before)


def test_constant_channel_inside_the_mask_is_named(masked_volume: Volume) -> None:
    data = masked_volume.data.copy()
    data[1][masked_volume.mask] = 4.0
    with pytest.raises(ValueError, match="channel 'b' is constant"):
        normalize_intensity(Volume(data, masked_volume.geometry, mask=masked_volume.mask, channel_names=("a", "b")))


@pytest.mark.parametrize(("lower", "upper"), [(-1.0, 99.0), (50.0, 50.0), (1.0, 101.0), (90.0, 10.0)])
def test_bad_percentiles(masked_volume: Volume, lower: float, upper: float) -> None:
    with pytest.raises(ValueError, match="lower"):
        normalize_intensity(masked_volume, lower=lower, upper=upper)
