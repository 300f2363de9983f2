"""Kim & Kanezaki 2020 in 3D on small synthetic volumes with known intensity classes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jule3d import kanezaki
from jule3d.kanezaki import kanezaki_segment
from jule3d.metrics import nmi
from jule3d.volume import Volume

SHAPE = (24, 24, 24)
CLASS_MEANS = np.array([0.0, 1.0, 2.0])  # class i + 1 has mean CLASS_MEANS[i]
FAST = {"n_channels": 16, "max_iter": 15}  # a second or less per call on one core


def _truth() -> np.ndarray:
    """Three slabs with wavy boundaries, labelled 1..3 (dimmest to brightest), in a ball mask."""
    z, y, x = np.mgrid[tuple(slice(0, s) for s in SHAPE)]
    n = SHAPE[2]
    labels = 1 + np.digitize(x + 2 * np.sin(y / 3.0) + np.cos(z / 4.0), [n / 3, 2 * n / 3])
    ball = (z - 11.5) ** 2 + (y - 11.5) ** 2 + (x - 11.5) ** 2 < 11.5**2
    return np.where(ball, labels, 0).astype(np.uint8)


@pytest.fixture(scope="module")
def truth() -> np.ndarray:
    return _truth()


@pytest.fixture(scope="module")
def volume(truth: np.ndarray) -> Volume:
    """One channel: class means 0, 1, 2 plus Gaussian noise (std 0.2); mask = the ball."""
    rng = np.random.default_rng(0)
    image = CLASS_MEANS[np.maximum(truth, 1) - 1] + rng.normal(0.0, 0.2, SHAPE)
    image[truth == 0] = -3.0
    return Volume.from_array(image.astype(np.float32), mask=truth > 0)


@pytest.fixture(scope="module")
def labels(volume: Volume) -> np.ndarray:
    return kanezaki_segment(volume, 3, seed=0, **FAST)


def test_recovers_intensity_classes_with_exactly_k_ordered_labels(
    labels: np.ndarray, volume: Volume, truth: np.ndarray
) -> None:
    inside = truth > 0
    assert labels.shape == SHAPE and labels.dtype == np.uint8
    assert not labels[~inside].any()
    assert set(np.unique(labels[inside])) == {1, 2, 3}
    # chance is ~0. k-means scores ~0.95 here; the method stops once <= 3 labels remain and then has
    # often merged two classes (NMI 0.40-0.71 over seeds 0-4 with these options).
    assert nmi(truth[inside], labels[inside]) > 0.3
    means = [volume.data[0][labels == c].mean() for c in (1, 2, 3)]
    assert means == sorted(means)


def test_deterministic_under_a_seed_and_leaves_torch_state_alone(
    labels: np.ndarray, volume: Volume
) -> None:
    rng_state = torch.random.get_rng_state()
    deterministic = torch.are_deterministic_algorithms_enabled()
    again = kanezaki_segment(volume, 3, seed=0, **FAST)
    np.testing.assert_array_equal(again, labels)
    assert torch.equal(torch.random.get_rng_state(), rng_state)
    assert torch.are_deterministic_algorithms_enabled() == deterministic


def test_explicit_mask_and_random_crops(volume: Volume, truth: np.ndarray) -> None:
    """A mask smaller than the volume's is obeyed; a crop smaller than the volume trains on crops."""
    half = (truth > 0) & (np.arange(SHAPE[0]) < 12)[:, None, None]
    out = kanezaki_segment(volume, 3, mask=half, seed=1, crop_size=12, **FAST)
    assert not out[~half].any()
    assert set(np.unique(out[half])) == {1, 2, 3}


def test_two_channels(truth: np.ndarray) -> None:
    rng = np.random.default_rng(1)
    inside = np.maximum(truth, 1) - 1
    first = np.array([0.0, 2.0, 2.0])[inside] + rng.normal(0.0, 0.2, SHAPE)
    second = np.array([1.0, 0.0, 2.0])[inside] + rng.normal(0.0, 0.2, SHAPE)
    vol = Volume.from_array(np.stack([first, second]).astype(np.float32), mask=truth > 0)
    out = kanezaki_segment(vol, 3, seed=0, **FAST)
    assert set(np.unique(out[truth > 0])) == {1, 2, 3}


def test_chunked_inference_matches_one_pass(volume: Volume, monkeypatch: pytest.MonkeyPatch) -> None:
    """The halo makes the responses independent of the chunk size."""
    net = kanezaki._ResponseNet(1, 8, 2).eval()
    x = torch.from_numpy(np.asarray(volume.data, dtype=np.float32))[None]
    mask = volume.mask

    def responses() -> np.ndarray:
        out = np.zeros((mask.size, 8), dtype=np.float32)
        for index, values in kanezaki._chunk_responses(net, x, mask, halo=2):
            out[index] = values.numpy()
        return out

    whole = responses()
    monkeypatch.setattr(kanezaki, "_CHUNK", 7)
    np.testing.assert_allclose(responses(), whole, rtol=1e-5, atol=1e-5)
    assert np.abs(whole[mask.ravel()]).sum(axis=1).min() > 0  # every mask voxel was written


def test_fewer_labels_than_k_are_split_by_kmeans(volume: Volume) -> None:
    """A network whose argmax uses one label still yields exactly k classes (the fallback)."""
    net = kanezaki._ResponseNet(1, 8, 1).eval()
    with torch.no_grad():
        net.layers[-1].bias[0] = 100.0  # channel 0 always wins the argmax
    x = torch.from_numpy(np.asarray(volume.data, dtype=np.float32))[None]
    codes = kanezaki._label_mask(net, x, volume.mask, 1, 3, 0, np.random.default_rng(0))
    assert codes.shape == (int(volume.mask.sum()),)
    assert set(np.unique(codes)) == {0, 1, 2}


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"n_classes": 1}, "n_classes"),
        ({"n_classes": 2.5}, "n_classes"),
        ({"n_classes": True}, "n_classes"),
        ({"mask": np.zeros(SHAPE, dtype=bool)}, "mask"),
        ({"mask": np.ones((4, 4, 4), dtype=bool)}, "mask"),
        ({"n_channels": 3}, "n_channels"),
        ({"n_conv": 0}, "n_conv"),
        ({"mu": -1.0}, "mu"),
        ({"mu": float("nan")}, "mu"),
        ({"lr": 0.0}, "lr"),
        ({"max_iter": -1}, "max_iter"),
        ({"max_iter": 1.5}, "max_iter"),
        ({"crop_size": 2}, "crop_size"),
    ],
)
def test_refuses_bad_input(volume: Volume, kwargs: dict, name: str) -> None:
    args = {"n_classes": 3, **kwargs}
    with pytest.raises(ValueError, match=name):
        kanezaki_segment(volume, **args)
