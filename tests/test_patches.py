"""Tests of patch sampling, grid patches, extraction, PatchSet files and isotropic resampling."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import jule3d.patches as patches_module
from jule3d.patches import (
    PatchSet,
    extract_patches,
    grid_patches,
    patch_size_for,
    resample_isotropic,
    sample_patches,
)
from jule3d.volume import Volume


@pytest.fixture
def blob() -> Volume:
    """Two-channel random volume (18, 20, 22) with an off-centre ellipsoidal mask."""
    rng = np.random.default_rng(0)
    data = rng.normal(size=(2, 18, 20, 22)).astype(np.float32)
    z, y, x = np.ogrid[:18, :20, :22]
    mask = ((z - 8) / 7.0) ** 2 + ((y - 11) / 8.0) ** 2 + ((x - 10) / 9.0) ** 2 <= 1.0
    return Volume.from_array(data, spacing=(0.5, 0.6, 0.7), mask=mask)


def _slice(array: np.ndarray, center: np.ndarray, w: int) -> np.ndarray:
    """The ``w``³ block of the last three axes of ``array`` centred on ``center`` (plain slicing)."""
    r = w // 2
    return array[(...,) + tuple(slice(c - r, c + r + 1) for c in center)]


def _brute_force_eligible(mask: np.ndarray, w: int, min_foreground: float) -> set[tuple[int, int, int]]:
    """Every valid centre, found by looking at each position separately."""
    r = w // 2
    ranges = [range(r, n - r) for n in mask.shape]
    return {
        c for c in itertools.product(*ranges)
        if mask[c] and _slice(mask, np.array(c), w).mean() >= min_foreground
    }


# ------------------------------------------------------------------------------ sample_patches


def test_sampled_patches_satisfy_every_invariant(blob):
    w, fmin = 7, 0.6
    ps = sample_patches(blob, 150, patch_size=w, min_foreground=fmin, seed=3, background="keep")
    assert ps.patches.shape == (150, 2, w, w, w) and ps.patches.dtype == np.float32
    assert ps.centers.shape == (150, 3) and len(ps) == 150 and ps.n_channels == 2
    assert ps.patch_size == w and ps.spacing == blob.spacing and ps.labels is None
    assert len({tuple(c) for c in ps.centers}) == 150  # no duplicates
    for patch, center in zip(ps.patches, ps.centers):
        assert blob.mask[tuple(center)]
        assert _slice(blob.mask, center, w).mean() >= fmin
        np.testing.assert_array_equal(patch, _slice(blob.data, center, w))


def test_eligible_positions_match_brute_force(blob):
    w, fmin = 5, 0.7
    expected = _brute_force_eligible(blob.mask, w, fmin)
    everything = sample_patches(blob, len(expected), patch_size=w, min_foreground=fmin)
    assert {tuple(c) for c in everything.centers} == expected
    with pytest.raises(ValueError, match=f"only {len(expected)} patch positions"):
        sample_patches(blob, len(expected) + 1, patch_size=w, min_foreground=fmin)


def test_sampling_is_deterministic_by_seed(blob):
    a = sample_patches(blob, 40, patch_size=5, seed=11)
    b = sample_patches(blob, 40, patch_size=5, seed=11)
    c = sample_patches(blob, 40, patch_size=5, seed=12)
    np.testing.assert_array_equal(a.centers, b.centers)
    np.testing.assert_array_equal(a.patches, b.patches)
    assert not np.array_equal(a.centers, c.centers)


def test_background_modes(blob):
    w = 9
    keep = sample_patches(blob, 60, patch_size=w, min_foreground=0.3, seed=1, background="keep")
    zero = sample_patches(blob, 60, patch_size=w, min_foreground=0.3, seed=1, background="zero")
    mean = sample_patches(blob, 60, patch_size=w, min_foreground=0.3, seed=1, background="mean")
    np.testing.assert_array_equal(keep.centers, zero.centers)
    fg = np.stack([_slice(blob.mask, c, w) for c in keep.centers])[:, None]
    fg = np.broadcast_to(fg, keep.patches.shape)
    assert (~fg).any(), "the test needs patches with air"
    np.testing.assert_array_equal(zero.patches[fg], keep.patches[fg])
    assert np.all(zero.patches[~fg] == 0)
    np.testing.assert_array_equal(mean.patches[fg], keep.patches[fg])
    fg_mean = (keep.patches * fg).sum((2, 3, 4)) / fg.sum((2, 3, 4))
    air_value = np.where(~fg, mean.patches, np.nan)
    np.testing.assert_allclose(np.nanmax(air_value, (2, 3, 4)), fg_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.nanmin(air_value, (2, 3, 4)), fg_mean, rtol=1e-5, atol=1e-6)


def test_labels_at_the_centres(blob):
    labels = np.arange(np.prod(blob.shape)).reshape(blob.shape)
    ps = sample_patches(blob, 30, patch_size=5, labels=labels)
    np.testing.assert_array_equal(ps.labels, labels[tuple(ps.centers.T)])


def test_without_border_exclusion_centres_reach_the_border():
    data = np.random.default_rng(1).normal(size=(12, 12, 12)).astype(np.float32)
    volume = Volume.from_array(data)  # no mask: every voxel is foreground
    w = 5
    ps = sample_patches(volume, 12**3, patch_size=w, min_foreground=0.0, exclude_border=False,
                        background="keep")
    assert {tuple(c) for c in ps.centers} == set(itertools.product(range(12), repeat=3))
    padded = np.pad(data, 2, mode="symmetric")
    for patch, center in zip(ps.patches, ps.centers):
        np.testing.assert_array_equal(patch[0], _slice(padded, center + 2, w))
    # Out-of-volume voxels count as air: a corner patch is 3³/5³ inside.
    corner = sample_patches(volume, 8, patch_size=w, min_foreground=0.216, exclude_border=False)
    assert len(corner) == 8
    with pytest.raises(ValueError, match="only"):
        sample_patches(volume, 12**3 - 7, patch_size=w, min_foreground=0.217, exclude_border=False)


def test_chunked_extraction_equals_single_pass(blob, monkeypatch):
    ps = sample_patches(blob, 50, patch_size=7, seed=2, background="mean")
    monkeypatch.setattr(patches_module, "CHUNK_BYTES", 3 * 2 * 7**3 * 4)  # 3 patches per chunk
    chunked = sample_patches(blob, 50, patch_size=7, seed=2, background="mean")
    np.testing.assert_array_equal(ps.patches, chunked.patches)


def test_works_on_the_phantom():
    from jule3d.phantom import make_phantom

    ph = make_phantom(shape=(48, 48, 48), seed=0)
    ps = sample_patches(ph.volume, 200, patch_size=15, labels=ph.labels)
    assert set(np.unique(ps.labels)) == {1, 2, 3}


# ------------------------------------------------------------------------------ grid_patches


@pytest.mark.parametrize("stride", [1, 3, 4])
def test_grid_patches_are_the_eligible_grid_positions(blob, stride):
    w, fmin = 5, 0.5
    ps = grid_patches(blob, stride, patch_size=w, min_foreground=fmin, background="keep")
    expected = {c for c in _brute_force_eligible(blob.mask, w, fmin)
                if all((ci - w // 2) % stride == 0 for ci in c)}
    assert [tuple(c) for c in ps.centers] == sorted(expected)
    for patch, center in zip(ps.patches, ps.centers):
        np.testing.assert_array_equal(patch, _slice(blob.data, center, w))


def test_grid_with_nothing_eligible_raises(blob):
    with pytest.raises(ValueError, match="no grid position"):
        grid_patches(blob, 50, patch_size=5, min_foreground=1.0)


# ------------------------------------------------------------------------------ extract_patches


def test_extract_patches_equals_slicing(blob):
    centers = np.array([[3, 3, 3], [14, 16, 18], [8, 9, 10]])
    out = extract_patches(blob, centers, 7)
    assert out.shape == (3, 2, 7, 7, 7)
    for patch, center in zip(out, centers):
        np.testing.assert_array_equal(patch, _slice(blob.data, center, 7))


@pytest.mark.parametrize("centers", [[[2, 3, 3]], [[3, 3, 19]], [[3.0, 3.0, 3.0]], [3, 3, 3]])
def test_extract_patches_rejects_bad_centres(blob, centers):
    with pytest.raises(ValueError, match="centers"):
        extract_patches(blob, np.array(centers), 7)


# ------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"patch_size": 6}, "patch_size must be odd"),
        ({"patch_size": 0}, "patch_size"),
        ({"patch_size": -3}, "patch_size"),
        ({"patch_size": 5.0}, "patch_size"),
        ({"patch_size": 19}, "patch_size=19 is larger than the volume"),
        ({"n_patches": 0}, "n_patches"),
        ({"n_patches": -1}, "n_patches"),
        ({"min_foreground": -0.1}, "min_foreground"),
        ({"min_foreground": 1.5}, "min_foreground"),
        ({"background": "air"}, "background"),
        ({"labels": np.zeros((3, 3, 3))}, "labels shape"),
    ],
)
def test_sample_patches_bad_input(blob, kwargs, message):
    arguments = {"n_patches": 5, "patch_size": 5} | kwargs
    with pytest.raises(ValueError, match=message):
        sample_patches(blob, **arguments)


def test_empty_mask_raises(blob):
    blob.mask = np.zeros(blob.shape, dtype=bool)  # bypasses Volume's own check on purpose
    with pytest.raises(ValueError, match="mask is empty"):
        sample_patches(blob, 5, patch_size=5)
    with pytest.raises(ValueError, match="mask is empty"):
        grid_patches(blob, 2, patch_size=5)


@pytest.mark.parametrize("stride", [0, -2, 1.5])
def test_grid_bad_stride(blob, stride):
    with pytest.raises(ValueError, match="stride"):
        grid_patches(blob, stride, patch_size=5)


# ------------------------------------------------------------------------------ PatchSet files


@pytest.mark.parametrize("with_labels", [True, False])
def test_patchset_save_load_round_trip(blob, tmp_path, with_labels):
    labels = np.arange(np.prod(blob.shape)).reshape(blob.shape) if with_labels else None
    ps = sample_patches(blob, 20, patch_size=5, labels=labels)
    path = ps.save(tmp_path / "set.npz")
    back = PatchSet.load(path)
    np.testing.assert_array_equal(back.patches, ps.patches)
    np.testing.assert_array_equal(back.centers, ps.centers)
    assert back.patch_size == 5 and back.spacing == ps.spacing
    if with_labels:
        np.testing.assert_array_equal(back.labels, ps.labels)
    else:
        assert back.labels is None


def test_patchset_save_refuses_overwrite(blob, tmp_path):
    ps = sample_patches(blob, 5, patch_size=5)
    target = tmp_path / "set.npz"
    target.write_bytes(b"old")
    with pytest.raises(FileExistsError, match="set.npz"):
        ps.save(target)
    assert target.read_bytes() == b"old"
    ps.save(target, overwrite=True)
    assert len(PatchSet.load(target)) == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set.npz"]  # no temporary file left


def test_patchset_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        PatchSet.load(tmp_path / "missing.npz")
    other = tmp_path / "other.npz"
    np.savez(other, something=np.zeros(3))
    with pytest.raises(ValueError, match="not a PatchSet"):
        PatchSet.load(other)


def test_patchset_checks_shapes():
    with pytest.raises(ValueError, match="patches must have shape"):
        PatchSet(np.zeros((2, 1, 5, 5, 4)), np.zeros((2, 3), int), 5)
    with pytest.raises(ValueError, match="centers"):
        PatchSet(np.zeros((2, 1, 5, 5, 5)), np.zeros((3, 3), int), 5)
    with pytest.raises(ValueError, match="labels"):
        PatchSet(np.zeros((2, 1, 5, 5, 5)), np.zeros((2, 3), int), 5, labels=np.zeros(3))


# ------------------------------------------------------------------------------ resampling


def test_resample_isotropic_geometry_and_values(oblique_geometry):
    """A linear function of physical position is reproduced exactly on the new grid."""
    g = oblique_geometry  # shape (20, 24, 28), spacing (0.7, 0.8, 1.5), rotated, offset origin

    def physical(geometry, shape):
        idx = np.indices(shape).reshape(3, -1)[::-1].T  # (x, y, z) indices
        d = np.asarray(geometry.direction).reshape(3, 3)
        return (np.asarray(geometry.origin) + (idx * np.asarray(geometry.spacing)) @ d.T).T

    def ramp(points):
        return (0.3 * points[0] - 0.2 * points[1] + 0.1 * points[2]).astype(np.float32)

    data = ramp(physical(g, g.shape)).reshape(g.shape)
    mask = np.zeros(g.shape, bool)
    mask[5:15, 6:18, 7:21] = True
    volume = Volume(data[None], g, mask=mask)
    iso = resample_isotropic(volume)
    assert iso.spacing == (0.7, 0.7, 0.7)
    assert iso.shape == (round(20 * 1.5 / 0.7), round(24 * 0.8 / 0.7), 28)
    assert iso.geometry.origin == g.origin and iso.geometry.direction == g.direction
    expected = ramp(physical(iso.geometry, iso.shape)).reshape(iso.shape)
    # Inside the input's sampled range linear interpolation of a linear function is exact.
    inner = tuple(slice(0, int((n - 1) * s_old / 0.7)) for n, s_old in zip(g.shape, g.spacing_zyx))
    np.testing.assert_allclose(iso.data[0][inner], expected[inner], atol=1e-4)
    # Nearest-neighbour mask: the box [5, 15) along z (1.5 mm) covers [7.5, 22.5) mm.
    z_mm = np.arange(iso.shape[0]) * 0.7
    in_box = (np.floor(z_mm / 1.5 + 0.5) >= 5) & (np.floor(z_mm / 1.5 + 0.5) < 15)
    np.testing.assert_array_equal(iso.mask[:, 12, 14], in_box)


def test_resample_to_a_given_spacing_and_identity(blob):
    coarse = resample_isotropic(blob, 1.0)
    assert coarse.spacing == (1.0, 1.0, 1.0)
    assert coarse.shape == (round(18 * 0.7), round(20 * 0.6), round(22 * 0.5))
    assert coarse.n_channels == 2 and coarse.mask.shape == coarse.shape
    iso = Volume.from_array(np.zeros((4, 4, 4), np.float32), spacing=(0.5, 0.5, 0.5))
    assert resample_isotropic(iso) is iso
    for bad in (0, -1.0, float("nan"), "1"):
        with pytest.raises(ValueError, match="spacing"):
            resample_isotropic(blob, bad)
    with pytest.raises(ValueError, match="order"):
        resample_isotropic(blob, order=7)


def test_patch_size_for():
    iso = Volume.from_array(np.zeros((4, 4, 4), np.float32), spacing=(0.5, 0.5, 0.5))
    assert patch_size_for(iso, 13.5) == 27
    assert patch_size_for(iso, 12.6) == 25
    assert patch_size_for(iso, 0.1) == 1
    assert patch_size_for(iso, 10.0) % 2 == 1
    aniso = Volume.from_array(np.zeros((4, 4, 4), np.float32), spacing=(0.5, 0.5, 1.0))
    with pytest.raises(ValueError, match="resample_isotropic"):
        patch_size_for(aniso, 10.0)
    with pytest.raises(ValueError, match="physical_size_mm"):
        patch_size_for(iso, 0.0)
