"""Phase 2: dense grid features vs patch-wise ones, the projection rule, k-means and ``segment`` end to end."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from scipy import ndimage
from scipy.spatial.distance import cdist

import jule3d.jule
import jule3d.segmentation
from jule3d.checkpoint import save_model
from jule3d.estimator import JuleSegmenter, network_seeds, segment
from jule3d.grid import Grid
from jule3d.io import read_image, save_labels, save_volume
from jule3d.metrics import nmi
from jule3d.models import JuleNet3D, net_config
from jule3d.normalize import normalize_intensity
from jule3d.phantom import make_phantom
from jule3d.segmentation import (
    CONSENSUS_RESTARTS,
    CONSENSUS_WEIGHTS,
    MIN_CLASS_SHARE,
    RESTART_SEED_STEP,
    GridFeatures,
    choose_candidate,
    cluster_features,
    consensus_segment,
    grid_contacts,
    grid_features,
    joint_features,
    label_volume,
    local_intensity,
    merge_clusters,
    merge_segment,
    network_subsets,
    project_labels,
    refine_labels,
    smooth_labels,
    surface_positions,
    weight_agreement,
    whole_block,
)
from jule3d.segmentation import support as seg_support
from jule3d.volume import Geometry, Volume

TINY_TRAINING = dict(n_patches=150, epochs_per_period=1, final_epochs=1, k_s=5,
                     net_overrides=dict(n_filters=8, feature_dim=16), progress=False)


def _randomise(model: JuleNet3D, seed: int) -> JuleNet3D:
    """Weights of a useful scale and BatchNorm running statistics far from the identity."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.Conv3d, torch.nn.Linear)):
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * 0.2)
                module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.1)
            if isinstance(module, torch.nn.BatchNorm3d):
                n = module.num_features
                module.running_mean.copy_(torch.randn(n, generator=gen) * 0.3)
                module.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
                module.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                module.bias.copy_(torch.randn(n, generator=gen) * 0.2)
    return model


@pytest.fixture(scope="module")
def tiny_net() -> JuleNet3D:
    """Network stride 2 on 13³ patches (13 -> 11 -> 5 -> 3 -> 1)."""
    return _randomise(JuleNet3D(net_config("fast", patch_size=13, n_filters=8, feature_dim=16), seed=1), 1)


@pytest.fixture(scope="module")
def stride4_net() -> JuleNet3D:
    """Network stride 4 (two poolings) on 21³ patches (21 -> 19 -> 9 -> 7 -> 3 -> 1)."""
    cfg = net_config("fast", patch_size=21, n_filters=6, feature_dim=8, pool_after=(0, 1))
    return _randomise(JuleNet3D(cfg, seed=2), 2)


def _ellipsoid(shape: tuple[int, int, int], radii: tuple[float, float, float]) -> np.ndarray:
    z, y, x = np.ogrid[tuple(slice(0, s) for s in shape)]
    c = [(s - 1) / 2 for s in shape]
    return ((z - c[0]) / radii[0]) ** 2 + ((y - c[1]) / radii[1]) ** 2 + ((x - c[2]) / radii[2]) ** 2 <= 1


@pytest.fixture(scope="module")
def aniso_volume() -> Volume:
    """Anisotropic random volume (22, 19, 26) whose mask covers part of it."""
    rng = np.random.default_rng(3)
    shape = (22, 19, 26)
    mask = _ellipsoid(shape, (7, 6, 9)) & (np.arange(shape[2]) < 17)
    return Volume.from_array(rng.normal(size=shape).astype(np.float32), spacing=(0.7, 1.0, 2.0), mask=mask)


# ------------------------------------------------------------------------------------------------
# grid_features


@pytest.mark.parametrize("stride, chunk", [(1, 6), (2, 4), (2, 100), (4, 2)])
def test_dense_equals_patchwise(tiny_net: JuleNet3D, aniso_volume: Volume, stride: int, chunk: int) -> None:
    dense = grid_features(tiny_net, aniso_volume, stride=stride, method="dense", chunk=chunk)
    ref = grid_features(tiny_net, aniso_volume, stride=stride, method="patchwise", batch_size=37)
    assert dense.grid_shape == ref.grid_shape == tuple((s - 13) // stride + 1 for s in aniso_volume.shape)
    np.testing.assert_array_equal(dense.selected, ref.selected)
    assert 0 < dense.selected.sum() < dense.selected.size  # the mask is partial
    assert dense.features.shape == (dense.selected.sum(), 16)
    np.testing.assert_allclose(dense.features, ref.features, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(dense.features, axis=1), 1.0, atol=1e-5)
    # features differ between positions (the test would be vacuous with a constant network)
    assert np.ptp(dense.features, axis=0).max() > 0.1


@pytest.mark.parametrize("stride, chunk", [(1, 6), (2, 3), (8, 1)])
def test_dense_equals_patchwise_network_stride_4(stride4_net: JuleNet3D, stride: int, chunk: int) -> None:
    rng = np.random.default_rng(4)
    shape = (23, 25, 28)
    vol = Volume.from_array(rng.normal(size=shape).astype(np.float32), spacing=(1.0, 0.5, 1.5),
                            mask=_ellipsoid(shape, (10, 11, 13)))
    dense = grid_features(stride4_net, vol, stride=stride, chunk=chunk)
    ref = grid_features(stride4_net, vol, stride=stride, method="patchwise")
    np.testing.assert_array_equal(dense.selected, ref.selected)
    np.testing.assert_allclose(dense.features, ref.features, atol=1e-5)


def test_selected_positions_are_the_centres_in_the_mask(tiny_net: JuleNet3D, aniso_volume: Volume) -> None:
    grid = grid_features(tiny_net, aniso_volume, stride=2)
    assert grid.offset == 6 and grid.stride == 2
    all_centres = np.argwhere(np.ones(grid.grid_shape, bool)) * 2 + 6
    inside = aniso_volume.mask[tuple(all_centres.T)]
    np.testing.assert_array_equal(grid.selected.ravel(), inside)
    np.testing.assert_array_equal(grid.centers, all_centres[inside])


def test_grid_features_restores_training_mode(tiny_net: JuleNet3D, aniso_volume: Volume) -> None:
    tiny_net.train()
    try:
        grid_features(tiny_net, aniso_volume, stride=4)
        assert tiny_net.training
    finally:
        tiny_net.eval()


def test_stride_not_compatible_with_network_stride(tiny_net: JuleNet3D, aniso_volume: Volume) -> None:
    with pytest.raises(ValueError, match="stride=3"):
        grid_features(tiny_net, aniso_volume, stride=3)
    with pytest.raises(ValueError, match="stride"):
        grid_features(tiny_net, aniso_volume, stride=0)


def test_channel_mismatch(tiny_net: JuleNet3D, aniso_volume: Volume) -> None:
    two = Volume.from_array(np.stack([aniso_volume.data[0]] * 2), mask=aniso_volume.mask)
    with pytest.raises(ValueError, match="channel"):
        grid_features(tiny_net, two, stride=2)


def test_volume_smaller_than_patch(tiny_net: JuleNet3D) -> None:
    small = Volume.from_array(np.zeros((20, 12, 20), np.float32))
    with pytest.raises(ValueError, match="patch size 13"):
        grid_features(tiny_net, small, stride=2)


def test_bad_method_chunk_and_empty_grid(tiny_net: JuleNet3D, aniso_volume: Volume) -> None:
    with pytest.raises(ValueError, match="method"):
        grid_features(tiny_net, aniso_volume, method="sparse")
    with pytest.raises(ValueError, match="chunk"):
        grid_features(tiny_net, aniso_volume, chunk=0)
    corner = np.zeros(aniso_volume.shape, bool)
    corner[0, 0, 0] = True  # foreground only where no patch centre can lie
    with pytest.raises(ValueError, match="no grid position"):
        grid_features(tiny_net, aniso_volume.with_mask(corner), stride=2)


# ------------------------------------------------------------------------------------------------
# cluster_features


def test_cluster_features_bounds_and_determinism() -> None:
    rng = np.random.default_rng(0)
    feats = np.concatenate([rng.normal(c, 0.05, size=(40, 4)) for c in (0.0, 1.0, 2.0)]).astype(np.float32)
    with pytest.raises(ValueError, match="n_clusters"):
        cluster_features(feats, 1)
    with pytest.raises(ValueError, match="n_clusters"):
        cluster_features(feats, 2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="121 exceeds the 120"):
        cluster_features(feats, 121)
    a = cluster_features(feats, 3, seed=5)
    b = cluster_features(feats, 3, seed=5, max_fit=50)  # fitted on a sample, every row assigned
    assert a.shape == b.shape == (120,) and a.dtype == np.int32
    for out in (a, b):
        assert len(np.unique(out)) == 3
        for block in out.reshape(3, 40):  # the three blobs are found
            assert len(np.unique(block)) == 1
    np.testing.assert_array_equal(b, cluster_features(feats, 3, seed=5, max_fit=50))
    labels, d2 = cluster_features(feats, 3, seed=5, return_distances=True)
    np.testing.assert_array_equal(labels, a)
    assert d2.shape == (120, 3) and d2.dtype == np.float32
    np.testing.assert_array_equal(d2.argmin(axis=1), labels)
    blob_means = [feats[labels == j].mean(axis=0) for j in range(3)]  # k-means centroids of separated blobs
    np.testing.assert_allclose(d2, cdist(feats, np.array(blob_means), "sqeuclidean"), rtol=1e-3, atol=1e-4)


def test_class_distances_are_squared_distances_to_each_class_nearest_centre(monkeypatch) -> None:
    """The float32 matrix-product form agrees with the exact distances far from the origin, in row blocks."""
    import jule3d.clustering
    from jule3d.clustering import ClassModel

    monkeypatch.setattr(jule3d.clustering, "ROWS", 64)  # several row blocks
    rng = np.random.default_rng(0)
    rows = (rng.normal(size=(300, 9)) + 50).astype(np.float32)  # norms far above the distances
    centers = (rng.normal(size=(7, 9)) + 50).astype(np.float32)
    group = np.array([2, 0, 1, 0, 2, 2, 1])
    exact = cdist(rows.astype(np.float64), centers.astype(np.float64), "sqeuclidean")
    by_class = np.stack([exact[:, group == g].min(axis=1) for g in range(3)], axis=1)
    d2 = ClassModel(centers, group, None, 0.0, 1.0).distances(rows)
    assert d2.shape == (300, 3) and d2.dtype == np.float32
    np.testing.assert_allclose(d2, by_class, rtol=1e-5, atol=1e-5 * by_class.mean())
    np.testing.assert_array_equal(d2.argmin(axis=1), by_class.argmin(axis=1))
    shifted = ClassModel(centers, group, 0.5, 0.0, 1.0).distances(rows)  # nearest class at the margin
    np.testing.assert_allclose(shifted, by_class - by_class.min(axis=1, keepdims=True) + 0.5, rtol=1e-5, atol=1e-4)
    one_each = ClassModel(centers, np.arange(7), None, 0.0, 1.0).distances(rows)
    np.testing.assert_allclose(one_each, exact, rtol=1e-5, atol=1e-5 * exact.mean())


def test_joint_features_are_the_scaled_blocks_side_by_side() -> None:
    """Each used network's block centred and divided by its scale, then the intensity block times its factor
    (a divisor of 0 gives a zero column), in the order of ``networks``."""
    from jule3d.clustering import FeatureScaling

    rng = np.random.default_rng(0)
    features = [(rng.normal(size=(200, d)) * 3 + 1).astype(np.float32) for d in (4, 5, 6)]
    local = (rng.normal(size=(200, 2)) * 100).astype(np.float32)
    scaling = FeatureScaling.fit(features, (2, 0), local, np.array([7.0, 0.0], np.float32), 0.37)
    joint = scaling.transform(features, local)
    assert joint.shape == (200, 6 + 4 + 2) and joint.dtype == np.float32
    expected = np.hstack([(features[2] - scaling.means[0]) / scaling.scales[0],
                          (features[0] - scaling.means[1]) / scaling.scales[1],
                          np.float32(0.37) * ((local[:, :1] - scaling.local_center[0]) / np.float32(7.0)),
                          np.zeros((200, 1), np.float32)])
    np.testing.assert_array_equal(joint, expected)
    # the learnt part has total variance 1, split evenly between the networks
    assert np.isclose(joint[:, :10].var(axis=0).sum(), 1.0, rtol=1e-4)
    plain = FeatureScaling.fit(features, (1,), None, None, 0.0, centre=False).transform(features, None)
    np.testing.assert_array_equal(plain, features[1])
    alone = FeatureScaling.fit([], (), local, None, 1.0).transform([], local)  # the intensity block by itself
    np.testing.assert_allclose(alone, (local - local.mean(axis=0)) / local.std(axis=0), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# [ours] Potts smoothing of the grid labels


def _full_grid(shape: tuple[int, int, int], selected: np.ndarray | None = None) -> GridFeatures:
    selected = np.ones(shape, dtype=bool) if selected is None else selected
    return GridFeatures(np.zeros((int(selected.sum()), 1), np.float32), Grid(shape, 1, 1), selected)


def _potts_energy(grid: GridFeatures, d2: np.ndarray, labels: np.ndarray, beta: float, spacing) -> float:
    """The energy of ``smooth_labels``' docstring, by brute force over neighbour pairs."""
    scale = np.median(d2.min(axis=1))
    pos = np.argwhere(grid.selected)
    energy = d2[np.arange(len(labels)), labels].sum() / scale
    spacing = np.asarray(spacing, float)
    index = {tuple(p): i for i, p in enumerate(pos)}
    for i, p in enumerate(pos):
        for dz in (-1, 0, 1):
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    j = index.get((p[0] + dz, p[1] + dy, p[2] + dx))
                    if j is not None and j > i and labels[j] != labels[i]:
                        energy += beta * spacing.min() / np.linalg.norm(np.array([dz, dy, dx]) * spacing)
    return float(energy)


def test_smooth_labels_zero_beta_is_kmeans_and_isolated_label_flips() -> None:
    grid = _full_grid((7, 7, 7))
    d2 = np.tile(np.array([[0.0, 1.0]], np.float32), (343, 1)) + 1.0  # every position prefers label 0 ...
    centre = np.ravel_multi_index((3, 3, 3), (7, 7, 7))
    d2[centre] = [1.5, 1.0]  # ... but the centre mildly prefers 1
    np.testing.assert_array_equal(smooth_labels(grid, d2, 0.0), d2.argmin(axis=1))
    smoothed = smooth_labels(grid, d2, 0.1)
    assert smoothed[centre] == 0 and (smoothed == 0).all()
    d2[centre] = [100.0, 1.0]  # a strong preference survives a weak smoothness term
    assert smooth_labels(grid, d2, 0.1)[centre] == 1


def test_smooth_labels_never_raises_the_energy_and_is_deterministic() -> None:
    rng = np.random.default_rng(3)
    selected = rng.random((6, 8, 5)) < 0.8  # holes: positions without a feature take no part
    grid = _full_grid((6, 8, 5), selected)
    d2 = rng.random((int(selected.sum()), 3)).astype(np.float32)
    spacing = (2.0, 1.0, 0.5)
    start = d2.argmin(axis=1)
    for beta in (0.2, 1.0, 5.0):
        out = smooth_labels(grid, d2, beta, spacing=spacing)
        assert out.dtype == np.int32 and out.shape == start.shape
        assert _potts_energy(grid, d2, out, beta, spacing) < _potts_energy(grid, d2, start, beta, spacing)
        np.testing.assert_array_equal(out, smooth_labels(grid, d2, beta, spacing=spacing))
        # a local minimum: no single relabelling lowers the energy
        for i in rng.choice(len(out), 10, replace=False):
            for label in range(3):
                trial = out.copy()
                trial[i] = label
                assert _potts_energy(grid, d2, trial, beta, spacing) >= _potts_energy(grid, d2, out, beta, spacing) - 1e-6


def _icm_every_position(selected: np.ndarray, d2: np.ndarray, beta: float, spacing, max_iter: int = 20) -> np.ndarray:
    """ICM as ``smooth_labels``' docstring states it, evaluating every position in every sweep (the reference
    for the version that re-evaluates only positions next to a move)."""
    offsets = [o for o in np.ndindex(3, 3, 3) if o != (1, 1, 1)]
    spacing = np.asarray(spacing, float)
    weights = [np.float32(spacing.min() / np.linalg.norm((np.array(o) - 1) * spacing)) for o in offsets]
    scale = np.float32(np.median(d2.min(axis=1)))
    k = d2.shape[1]
    unary = np.zeros(selected.shape + (k,), np.float32)
    unary[selected] = d2 / scale
    labels = np.zeros(selected.shape, np.int64)
    labels[selected] = d2.argmin(axis=1)
    for _ in range(max_iter):
        changed = 0
        for parity in np.ndindex(2, 2, 2):
            onehot = np.zeros(tuple(n + 2 for n in selected.shape) + (k,), np.float32)
            onehot[1:-1, 1:-1, 1:-1][selected, labels[selected]] = 1.0
            for p in map(tuple, np.argwhere(selected)):
                if tuple(c % 2 for c in p) != parity:
                    continue
                votes = np.zeros(k, np.float32)
                for o, w in zip(offsets, weights):
                    votes += w * onehot[p[0] + o[0], p[1] + o[1], p[2] + o[2]]
                best = int((unary[p] - np.float32(beta) * votes).argmin())
                changed += best != labels[p]
                labels[p] = best
        if changed == 0:
            break
    return labels[selected]


def test_smooth_labels_equal_icm_over_every_position() -> None:
    # a smooth preference field plus noise: many positions move in the first sweeps, few later, so both the
    # whole-class and the gathered evaluation run
    rng = np.random.default_rng(5)
    shape = (12, 10, 9)
    selected = rng.random(shape) < 0.9
    field = ndimage.gaussian_filter(rng.normal(size=shape + (3,)), (2, 2, 2, 0))
    d2 = (0.2 * rng.random((int(selected.sum()), 3)) + 4 * (field[selected] - field.min())).astype(np.float32)
    for beta, spacing in ((0.5, (1.0, 1.0, 1.0)), (2.0, (2.0, 1.0, 1.0))):
        reference = _icm_every_position(selected, d2, beta, spacing)
        assert (reference != d2.argmin(axis=1)).mean() > 0.05
        np.testing.assert_array_equal(smooth_labels(selected, d2, beta, spacing=spacing), reference)


def test_smooth_labels_neighbour_weights_follow_the_spacing() -> None:
    # Positions A=(0,0,0), M=(0,0,1), B=(0,0,2) along x and Z=(1,0,1) above M. A and Z want label 0,
    # B wants 1, M mildly prefers 1 (cost 1 vs 1.5). M's votes: A + Z for 0, B for 1. With unit spacing
    # Z weighs 1: E(0) = 1.5 - 2 < E(1) = 1 - 1. With z spacing 4 it weighs 1/4: E(0) = 1.5 - 1.25 > E(1).
    selected = np.zeros((2, 1, 3), dtype=bool)
    selected[0, 0, :] = True
    selected[1, 0, 1] = True
    grid = _full_grid((2, 1, 3), selected)
    d2 = np.array([[1, 10], [1.5, 1], [10, 1], [1, 10]], np.float32)  # rows: A, M, B, Z (argwhere order)
    assert smooth_labels(grid, d2, 1.0, spacing=(1.0, 1.0, 1.0)).tolist() == [0, 0, 1, 0]
    assert smooth_labels(grid, d2, 1.0, spacing=(4.0, 1.0, 1.0)).tolist() == [0, 1, 1, 0]


def test_smooth_labels_bad_arguments() -> None:
    grid = _full_grid((3, 3, 3))
    d2 = np.ones((27, 2), np.float32)
    for beta in (-1.0, float("nan"), True):
        with pytest.raises(ValueError, match="smoothing"):
            smooth_labels(grid, d2, beta)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="27 featured positions"):
        smooth_labels(grid, d2[:5], 1.0)
    with pytest.raises(ValueError, match="spacing"):
        smooth_labels(grid, d2, 1.0, spacing=(1.0, 0.0, 1.0))


# ------------------------------------------------------------------------------------------------
# project_labels


def _block_expected(shape, offset, stride, grid_shape, coarse):
    """Brute force: voxel v belongs to grid index floor((v - (offset - stride//2)) / stride), clipped."""
    idx = [np.clip((np.arange(s) - (offset - stride // 2)) // stride, 0, g - 1) for s, g in zip(shape, grid_shape)]
    return coarse[np.ix_(*idx)]


@pytest.mark.parametrize("offset, stride", [(6, 2), (6, 3), (1, 4), (4, 1)])
def test_project_labels_full_grid(offset: int, stride: int) -> None:
    shape = (23, 20, 25)
    w = 2 * offset + 1
    grid_shape = tuple((s - w) // stride + 1 for s in shape)
    rng = np.random.default_rng(stride)
    coarse = rng.integers(0, 3, grid_shape)
    expected_raw = _block_expected(shape, offset, stride, grid_shape, coarse)
    mask = _ellipsoid(shape, (10, 9, 11))
    # intensity = cluster index: the ids 1..k follow the cluster order
    vol = Volume.from_array(expected_raw.astype(np.float32) + rng.normal(0, 0.01, shape).astype(np.float32),
                            spacing=(1.0, 2.0, 0.5), mask=mask)
    grid = GridFeatures(np.zeros((coarse.size, 2), np.float32), Grid(shape, 2 * offset + 1, stride),
                        np.ones(grid_shape, bool))
    assert grid.grid_shape == grid_shape
    labels = project_labels(grid, coarse.ravel(), vol)
    assert labels.shape == shape and labels.dtype == np.uint8
    np.testing.assert_array_equal(labels[~mask], 0)
    present = np.unique(expected_raw[mask])
    assert len(present) == 3
    np.testing.assert_array_equal(labels[mask], np.searchsorted(present, expected_raw[mask]) + 1)
    # each centre's stride³ block (clipped to the volume) carries its label
    c = np.array([offset, offset, offset]) + stride * np.array([1, 1, 1])
    lo = np.maximum(c - stride // 2, 0)
    full = Volume.from_array(vol.data, spacing=(1.0, 2.0, 0.5))
    labels_full = project_labels(grid, coarse.ravel(), full)
    block = labels_full[tuple(slice(a, b) for a, b in zip(lo, c - stride // 2 + stride))]
    assert np.all(block == coarse[1, 1, 1] + 1)
    # border voxels (within w//2 of every edge, where no patch fits) are labelled too
    assert labels_full.min() >= 1
    assert np.all(labels_full[: w // 2] > 0) and np.all(labels_full[:, :, -(w // 2) - 1:] > 0)


def test_project_labels_odd_stride_is_nearest_centre_in_mm() -> None:
    shape, offset, stride = (16, 13, 18), 2, 3
    grid_shape = tuple((s - 5) // stride + 1 for s in shape)
    rng = np.random.default_rng(1)
    coarse = rng.integers(0, 4, grid_shape)
    spacing_xyz = (0.4, 1.3, 2.5)
    centres = np.argwhere(np.ones(grid_shape, bool)) * stride + offset
    voxels = np.argwhere(np.ones(shape, bool))
    sz = np.array(spacing_xyz[::-1])
    nearest = cdist(voxels * sz, centres * sz).argmin(axis=1)
    expected_raw = coarse.ravel()[nearest].reshape(shape)
    vol = Volume.from_array(expected_raw.astype(np.float32), spacing=spacing_xyz)
    grid = GridFeatures(np.zeros((coarse.size, 1), np.float32), Grid(shape, 2 * offset + 1, stride),
                        np.ones(grid_shape, bool))
    assert grid.grid_shape == grid_shape
    labels = project_labels(grid, coarse.ravel(), vol)
    present = np.unique(coarse)
    np.testing.assert_array_equal(labels, np.searchsorted(present, expected_raw) + 1)


def test_project_labels_missing_positions_take_nearest_featured_in_mm() -> None:
    # grid spacing in mm: z 3 per step, y 1 per step, x 1 per step (stride 1, spacing (x, y, z) = (1, 1, 3))
    shape, offset, stride = (9, 9, 9), 2, 1
    grid_shape = (5, 5, 5)
    selected = np.zeros(grid_shape, bool)
    selected[0, 2, 3] = True  # row 0 (C order): cluster 0
    selected[2, 2, 2] = True  # row 1: cluster 1
    selected[2, 4, 2] = True  # row 2: cluster 2
    clusters = np.array([0, 1, 2])
    spacing_xyz = (1.0, 1.0, 3.0)
    featured = np.argwhere(selected)
    sz = np.array(spacing_xyz[::-1])
    everything = np.argwhere(np.ones(grid_shape, bool))
    d = cdist(everything * sz, featured * sz)
    coarse = clusters[d.argmin(axis=1)].reshape(grid_shape)
    expected_raw = _block_expected(shape, offset, stride, grid_shape, coarse)
    vol = Volume.from_array(expected_raw.astype(np.float32), spacing=spacing_xyz)
    grid = GridFeatures(np.zeros((3, 2), np.float32), Grid(shape, 2 * offset + 1, stride), selected)
    assert grid.grid_shape == grid_shape
    labels = project_labels(grid, clusters, vol)
    # (2, 2, 3) is 1 mm (one x step) from cluster 1 but 6 mm (two z steps of 3 mm) from cluster 0, although
    # cluster 0 is nearer in grid steps along z than cluster 2 is along y: the spacing decides
    assert labels[offset + 2, offset + 2, offset + 3] == 2
    assert labels[offset + 0, offset + 3, offset + 3] == 1
    # ties (equal distance) may go either way; compare only the positions with a unique nearest
    dist_sorted = np.sort(d, axis=1)
    unique = (dist_sorted[:, 1] - dist_sorted[:, 0] > 1e-9).reshape(grid_shape)
    unique_vox = _block_expected(shape, offset, stride, grid_shape, unique)
    np.testing.assert_array_equal(labels[unique_vox], expected_raw[unique_vox] + 1)
    assert labels.min() == 1


# ------------------------------------------------------------------------------------------------
# label_volume / segment


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(shape=(40, 40, 40), seed=0)


def test_label_volume_ordered_by_intensity(tiny_net: JuleNet3D, phantom) -> None:
    labels = label_volume(tiny_net, phantom.volume, 3, stride=4, seed=0)
    mask = phantom.volume.mask
    assert set(np.unique(labels[mask])) == {1, 2, 3}
    np.testing.assert_array_equal(labels[~mask], 0)
    means = [phantom.volume.data[0][labels == k].mean() for k in (1, 2, 3)]
    assert means == sorted(means)
    np.testing.assert_array_equal(labels, label_volume(tiny_net, phantom.volume, 3, stride=4, seed=0))


@pytest.fixture(scope="module")
def segmented(phantom) -> np.ndarray:
    return segment(phantom.volume, n_clusters=3, seed=0, **TINY_TRAINING)


def test_segment_end_to_end(phantom, segmented: np.ndarray) -> None:
    mask = phantom.volume.mask
    assert segmented.shape == (40, 40, 40) and segmented.dtype == np.uint8
    np.testing.assert_array_equal(segmented[~mask], 0)
    assert set(np.unique(segmented[mask])) == {1, 2, 3}
    means = [phantom.volume.data[0][segmented == k].mean() for k in (1, 2, 3)]
    assert means == sorted(means)


def test_segment_deterministic(phantom, segmented: np.ndarray) -> None:
    again = segment(phantom.volume, n_clusters=3, seed=0, **TINY_TRAINING)
    np.testing.assert_array_equal(again, segmented)


def test_segment_with_model_skips_training(phantom, tiny_net: JuleNet3D, tmp_path, monkeypatch) -> None:
    def no_training(*args, **kwargs):
        raise AssertionError("train_jule must not run when a model is given")

    monkeypatch.setattr(jule3d.jule, "train_jule", no_training)
    # segment() normalises a volume that is not yet, whatever the input's type
    expected = label_volume(tiny_net, normalize_intensity(phantom.volume), 3, stride=4, seed=0)
    np.testing.assert_array_equal(segment(phantom.volume, 3, model=tiny_net, stride=4, progress=False), expected)
    path = save_model(tiny_net, tmp_path / "tiny.pt")
    np.testing.assert_array_equal(segment(phantom.volume, 3, model=path, stride=4, progress=False), expected)
    np.testing.assert_array_equal(segment(phantom.volume, 3, model=str(path), stride=4, progress=False), expected)


def test_segment_plain_array_and_path(phantom, tiny_net: JuleNet3D, tmp_path) -> None:
    raw = np.asarray(phantom.volume.data[0])
    from_array = segment(raw, 3, model=tiny_net, stride=4, progress=False)
    assert from_array.shape == raw.shape and from_array.dtype == np.uint8
    assert set(np.unique(from_array)) == {0, 1, 2, 3}
    path = save_volume(phantom.volume, tmp_path / "ph.nii.gz")
    from_path = segment(path, 3, model=tiny_net, stride=4, progress=False)
    assert from_path.shape == raw.shape and set(np.unique(from_path)) == {0, 1, 2, 3}
    # an explicit mask array is honoured
    box = np.zeros(raw.shape, bool)
    box[5:35, 5:35, 5:35] = True
    boxed = segment(raw, 3, model=tiny_net, mask=box, stride=4, progress=False)
    np.testing.assert_array_equal(boxed == 0, ~box)


def test_segment_mask_file_of_other_geometry(phantom, tiny_net: JuleNet3D, tmp_path) -> None:
    other = Geometry((40, 40, 40), spacing=(1.0, 1.0, 1.0))
    path = save_labels(np.ones((40, 40, 40), np.uint8), tmp_path / "mask.nii.gz", reference=other)
    with pytest.raises(ValueError, match="mask"):
        segment(phantom.volume, 3, model=tiny_net, mask=path, stride=4, progress=False)


def test_segment_rejects_bad_arguments_before_training(phantom, monkeypatch) -> None:
    def no_training(*args, **kwargs):
        raise AssertionError("bad arguments must be rejected before training")

    monkeypatch.setattr(jule3d.jule, "train_jule", no_training)
    with pytest.raises(ValueError, match="n_clusters"):
        segment(phantom.volume, n_clusters=1, progress=False)
    with pytest.raises(ValueError, match="stride"):
        segment(phantom.volume, n_clusters=3, stride=0, progress=False)
    with pytest.raises(ValueError, match="stride=3"):
        segment(phantom.volume, n_clusters=3, stride=3, progress=False)


def test_geometry_survives_save_labels(phantom, tiny_net: JuleNet3D, oblique_geometry, tmp_path) -> None:
    geom = replace(oblique_geometry, shape=(40, 40, 40))
    vol = Volume(phantom.volume.data, geom, mask=phantom.volume.mask)
    labels = segment(vol, 3, model=tiny_net, stride=4, progress=False)
    path = save_labels(labels, tmp_path / "labels.nii.gz", reference=vol)
    array, read_geom = read_image(path)
    np.testing.assert_array_equal(array, labels)
    assert read_geom.shape == geom.shape
    np.testing.assert_allclose(read_geom.spacing, geom.spacing, atol=1e-6)
    np.testing.assert_allclose(read_geom.origin, geom.origin, atol=1e-5)
    np.testing.assert_allclose(read_geom.direction, geom.direction, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# [ours] local intensity appended to the features before k-means


def test_local_intensity_is_standardised_box_mean() -> None:
    rng = np.random.default_rng(0)
    data = rng.normal(size=(2, 30, 30, 30)).astype(np.float32)
    volume = Volume.from_array(data)
    model = JuleNet3D(net_config("fast", in_channels=2, patch_size=13, n_filters=4, feature_dim=8), seed=0)
    grid = grid_features(model, volume, stride=4)
    values = local_intensity(volume, grid, window=3)
    assert values.shape == (len(grid.features), 2)
    np.testing.assert_allclose(values.mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(values.std(axis=0), 1, atol=1e-4)
    z, y, x = grid.centers[5]
    raw = data[1, z - 1:z + 2, y - 1:y + 2, x - 1:x + 2].mean()
    box = ndimage.uniform_filter(data[1], size=3, mode="nearest")[tuple(grid.centers.T)]
    assert values[5, 1] == pytest.approx((raw - box.mean()) / box.std(), rel=1e-4)
    with pytest.raises(ValueError, match="intensity_window"):
        local_intensity(volume, grid, window=0)


def test_local_intensity_averages_only_the_foreground() -> None:
    # Tissue of intensity 1 in the lower half along x, 0 in the upper half, background -100 outside a ball:
    # positions at the ball's border must not be pulled towards the background.
    zz, yy, xx = np.mgrid[:30, :30, :30]
    inside = (zz - 14.5) ** 2 + (yy - 14.5) ** 2 + (xx - 14.5) ** 2 < 12 ** 2
    data = np.where(inside, (xx < 15).astype(np.float32), np.float32(-100))
    volume = Volume.from_array(data[None], mask=inside)
    model = JuleNet3D(net_config("fast", patch_size=13, n_filters=4, feature_dim=8), seed=0)
    grid = grid_features(model, volume, stride=1)
    raw = np.empty(len(grid.features))
    for i, (z, y, x) in enumerate(grid.centers):  # the definition, one box at a time
        box = tuple(slice(c - 2, c + 3) for c in (z, y, x))
        raw[i] = data[box][inside[box]].mean()
    values = local_intensity(volume, grid, window=5)[:, 0]
    np.testing.assert_allclose(values, (raw - raw.mean()) / raw.std(), atol=1e-4)
    assert raw.min() >= 0.0  # no background value leaked into any mean


def test_intensity_weight_recovers_intensity_classes_an_untrained_net_misses() -> None:
    phantom = make_phantom(shape=(40, 40, 40), variant="intensity", seed=0)
    model = JuleNet3D(net_config("fast"), seed=0)
    plain = label_volume(model, phantom.volume, 3, stride=2, seed=0, phase2="kmeans")
    weighted = label_volume(model, phantom.volume, 3, stride=2, seed=0, phase2="kmeans", intensity_weight=3.0)
    inside = phantom.labels > 0
    assert nmi(phantom.labels, weighted, inside) > 0.7
    assert nmi(phantom.labels, weighted, inside) > nmi(phantom.labels, plain, inside) + 0.2
    for bad in (-1.0, True):
        with pytest.raises(ValueError, match="intensity_weight"):
            label_volume(model, phantom.volume, 3, intensity_weight=bad)  # type: ignore[arg-type]


def test_smoothing_removes_speckle_of_a_noisy_segmentation() -> None:
    phantom = make_phantom(shape=(40, 40, 40), variant="intensity", seed=0)
    model = JuleNet3D(net_config("fast"), seed=0)
    inside = phantom.labels > 0
    plain = label_volume(model, phantom.volume, 3, stride=2, seed=0, phase2="kmeans", intensity_weight=3.0)
    smooth = label_volume(model, phantom.volume, 3, stride=2, seed=0, phase2="kmeans", intensity_weight=3.0,
                          smoothing=2.0)
    assert nmi(phantom.labels, smooth, inside) > nmi(phantom.labels, plain, inside)
    # fewer label changes between neighbouring voxels: a less ragged segmentation
    def changes(labels):
        return sum(int((np.diff(labels, axis=a) != 0).sum()) for a in range(3))
    assert changes(smooth) < changes(plain)
    with pytest.raises(ValueError, match="smoothing"):
        label_volume(model, phantom.volume, 3, smoothing=-1.0)


# ---------------------------------------------------------------------------------------------------------
# [ours] the default Phase 2: joint features, over-clustering, merge by contact and likeness, Potts


def _grid_of(labels: np.ndarray, features: np.ndarray | None = None) -> GridFeatures:
    """A stride-1 grid whose every position is featured, in row order of ``labels.ravel()``."""
    selected = np.ones(labels.shape, bool)
    feats = np.zeros((labels.size, 1), np.float32) if features is None else features
    return GridFeatures(feats, Grid(labels.shape, 1, 1), selected)


def test_grid_contacts_counts_face_neighbour_pairs() -> None:
    labels = np.zeros((1, 2, 3), np.int64)
    labels[0, :, 2] = 1  # two columns of 0, one of 1: 2 contacts along x, none along y between labels
    labels[0, 1, 0] = 2
    contacts = grid_contacts(_grid_of(labels), labels[labels >= 0].ravel(), 3)
    # pairs: (0,0)-(0,1) 0-0; (0,1)-(0,2) 0-1; (1,0)-(1,1) 2-0; (1,1)-(1,2) 0-1; y: (0,0)-(1,0) 0-2, (0,1)-(1,1) 0-0,
    # (0,2)-(1,2) 1-1
    expected = np.array([[0, 2, 2], [2, 0, 0], [2, 0, 0]], float)
    np.testing.assert_array_equal(contacts, expected)


def test_merge_clusters_joins_a_border_band_to_the_side_it_resembles() -> None:
    # Two tissues A (0) and B (1) that meet nowhere but through a thin band (2) of mixed patches, which
    # k-means would keep as a class of its own; the band looks more like A than like B.
    sizes = np.array([1000.0, 1000.0, 100.0])
    contacts = np.array([[0, 0, 150], [0, 0, 150], [150, 150, 0]], float)
    centroids = np.array([[0.0], [1.0], [0.35]])
    np.testing.assert_array_equal(merge_clusters(contacts, sizes, centroids, 2), [0, 1, 0])
    # fragments of one tissue that interleave merge before two tissues that only share an interface
    sizes = np.array([500.0, 500.0, 1000.0])
    contacts = np.array([[0, 900, 30], [900, 0, 30], [30, 30, 0]], float)
    centroids = np.array([[0.0], [0.3], [0.5]])
    np.testing.assert_array_equal(merge_clusters(contacts, sizes, centroids, 2), [0, 0, 1])
    np.testing.assert_array_equal(merge_clusters(contacts, sizes, centroids, 3), [0, 1, 2])
    # two separate pockets of one tissue (no contact) merge before either joins the tissue around them
    contacts = np.array([[0, 0, 100], [0, 0, 100], [100, 100, 0]], float)
    centroids = np.array([[0.0], [0.05], [1.0]])
    np.testing.assert_array_equal(merge_clusters(contacts, sizes, centroids, 2), [0, 0, 1])


def test_merge_clusters_keeps_a_small_distinct_class_but_not_a_speck_or_a_surface_layer() -> None:
    # Two touching halves of one tissue (0, 1) and a small cluster (2, 3 % of the positions) inside half 1 that
    # differs clearly from it, like a tumour core in a BraTS-ROI crop.
    contacts = np.array([[0, 400, 0], [400, 0, 60], [0, 60, 0]], float)
    centroids = np.array([[0.0], [0.6], [2.0]])
    sizes = np.array([1000.0, 1000.0, 60.0])
    np.testing.assert_array_equal(merge_clusters(contacts, sizes, centroids, 2), [0, 0, 1])
    # Ward's cost weighs the distance by the sizes and merges the small cluster first (the default before)
    np.testing.assert_array_equal(merge_clusters(contacts, sizes, centroids, 2, min_share=0.0, linkage="ward"),
                                  [0, 1, 1])
    # most of the small cluster on the surface of the foreground: the specimen's border layer, merged first
    np.testing.assert_array_equal(merge_clusters(contacts, sizes, centroids, 2, surface=np.array([0, 0, 31])),
                                  [0, 1, 1])
    np.testing.assert_array_equal(merge_clusters(contacts, sizes, centroids, 2, surface=np.array([0, 0, 30])),
                                  [0, 0, 1])
    # a border layer (2) that resembles the air of a cavity (1) joins the tissue beneath it (0), which it touches
    layer_contacts = np.array([[0, 50, 300], [50, 0, 10], [300, 10, 0]], float)
    layer_sizes, layer_centroids = np.array([1000.0, 200.0, 300.0]), np.array([[0.0], [-2.0], [-1.6]])
    np.testing.assert_array_equal(merge_clusters(layer_contacts, layer_sizes, layer_centroids, 2), [0, 1, 1])
    np.testing.assert_array_equal(
        merge_clusters(layer_contacts, layer_sizes, layer_centroids, 2, surface=np.array([0, 0, 250])), [0, 1, 0])
    # every group mostly on the surface (a thin specimen): the rule cannot tell them apart and is left out
    np.testing.assert_array_equal(
        merge_clusters(contacts, sizes, centroids, 2, surface=np.array([600, 600, 40])), [0, 0, 1])
    # the same small cluster with 0.5 % of the positions is a speck: it merges, with its cheapest partner, first
    sizes = np.array([1000.0, 1000.0, 10.0])
    np.testing.assert_array_equal(merge_clusters(contacts, sizes, centroids, 2), [0, 1, 1])
    np.testing.assert_array_equal(merge_clusters(contacts, sizes, centroids, 2, min_share=0.0), [0, 0, 1])
    with pytest.raises(ValueError, match="linkage must be one of"):
        merge_clusters(contacts, sizes, centroids, 2, linkage="single")


def test_surface_positions_are_those_within_a_grid_step_of_the_background() -> None:
    foreground = np.zeros((9, 9, 9), dtype=bool)
    foreground[1:8, 1:8, 1:8] = True
    centers = np.array([[4, 4, 1], [4, 4, 2], [4, 4, 3], [4, 4, 4], [2, 2, 2]])
    # depths 1, 2, 3, 4 and sqrt(3) voxels from the background
    np.testing.assert_array_equal(surface_positions(foreground, centers, 2), [True, True, False, False, True])
    assert not surface_positions(np.ones((5, 5, 5), bool), centers[:1] - 2, 2).any()  # no background at all
    rng = np.random.default_rng(0)  # the definition: a Euclidean distance to the background of at most depth
    speckled = rng.random((12, 13, 14)) > 0.02
    every = np.argwhere(speckled)
    for depth in (1, 2, 2.5, 4):
        expected = ndimage.distance_transform_edt(speckled)[tuple(every.T)] <= depth
        np.testing.assert_array_equal(surface_positions(speckled, every, depth), expected)
    model = JuleNet3D(net_config("fast", patch_size=13, n_filters=4, feature_dim=8), seed=0)
    cube = np.pad(np.ones((20, 20, 20), np.float32), 6)
    volume = Volume.from_array(cube, mask=cube > 0)
    grid = grid_features(model, volume, stride=2)
    surface = whole_block([grid], volume).surface()
    depth = surface_positions(volume.foreground(), grid.centers, 2)
    assert surface.shape == (len(grid.features),) and np.array_equal(surface, depth) and 0 < surface.mean() < 1


def test_joint_features_weighs_intensity_by_its_variance_at_label_scale() -> None:
    rng = np.random.default_rng(0)
    noise = rng.normal(size=(1, 30, 30, 30)).astype(np.float32)  # no structure above the voxel
    halves = noise * 0.3 + np.where(np.arange(30) < 15, -1.0, 1.0).astype(np.float32)[None, None, None, :]
    model = JuleNet3D(net_config("fast", patch_size=13, n_filters=4, feature_dim=8), seed=0)
    variances = {}
    for name, data in (("noise", noise), ("halves", halves)):
        volume = Volume.from_array(data)
        grid = grid_features(model, volume, stride=2)
        joint = joint_features([grid, grid], volume, intensity_weight=1.0, window=3)
        assert joint.shape == (len(grid.features), 2 * 8 + 1)
        np.testing.assert_allclose(np.mean(np.sum(joint[:, :16] ** 2, axis=1)), 1.0, rtol=1e-4)  # learnt block
        variances[name] = float(joint[:, -1].var())
        assert joint_features([grid], volume, intensity_weight=0.0).shape == (len(grid.features), 8)
    assert variances["noise"] < 0.1  # a 3³ mean of white noise keeps 1/27 of its variance
    assert variances["halves"] > 0.8  # regions of different brightness keep nearly all of it
    other = JuleNet3D(net_config("fast", patch_size=15, n_filters=4, feature_dim=8), seed=0)
    with pytest.raises(ValueError, match="share their positions"):
        joint_features([grid, grid_features(other, volume, stride=2)], volume)


def test_default_phase2_finds_intensity_classes_and_keeps_kmeans_reachable() -> None:
    phantom = make_phantom(shape=(40, 40, 40), variant="intensity", seed=0)
    model = JuleNet3D(net_config("fast"), seed=0)
    inside = phantom.labels > 0
    merged = label_volume(model, phantom.volume, 3, stride=2, seed=0)
    published = label_volume(model, phantom.volume, 3, stride=2, seed=0, phase2="kmeans")
    assert nmi(phantom.labels, merged, inside) > 0.7
    assert nmi(phantom.labels, merged, inside) > nmi(phantom.labels, published, inside) + 0.2
    assert set(np.unique(merged[inside])) == {1, 2, 3}
    np.testing.assert_array_equal(merged, label_volume([model], phantom.volume, 3, stride=2, seed=0))
    with pytest.raises(ValueError, match="phase2"):
        label_volume(model, phantom.volume, 3, phase2="agdl")


def _blocks_case(seed: int = 0) -> tuple[Volume, GridFeatures, GridFeatures, np.ndarray]:
    """Three slabs of equal brightness; network 0's features tell them apart, network 1's are noise."""
    rng = np.random.default_rng(seed)
    truth = np.repeat(np.arange(3), 8)[:, None, None] * np.ones((1, 16, 16), np.int64)  # (24, 16, 16)
    volume = Volume.from_array(rng.normal(size=truth.shape).astype(np.float32))
    centres = np.eye(3, 8, dtype=np.float32)[truth.ravel()]
    good = GridFeatures(centres + 0.35 * rng.normal(size=centres.shape).astype(np.float32), Grid(truth.shape, 1, 1),
                        np.ones(truth.shape, bool))
    noise = GridFeatures(rng.normal(size=centres.shape).astype(np.float32), good.grid, good.selected)
    return volume, good, noise, truth.ravel()


def test_consensus_keeps_the_candidate_that_agrees_with_the_others() -> None:
    volume, good, noise, truth = _blocks_case()
    result = consensus_segment([good, noise, good], volume, 3, seed=0)
    subsets = network_subsets(3)
    assert subsets == [(0, 1, 2), (0,), (1,), (2,)]
    assert result.candidates == [(s, w, r) for s in subsets for w in CONSENSUS_WEIGHTS
                                 for r in range(CONSENSUS_RESTARTS)]
    n = 4 * len(CONSENSUS_WEIGHTS) * CONSENSUS_RESTARTS
    assert result.agreement.shape == (n, n) and np.allclose(np.diag(result.agreement), 1.0)
    np.testing.assert_allclose(result.agreement, result.agreement.T)
    support = result.support
    # the chosen candidate is judged by the other network subsets' candidates among those that keep every class
    groups = [c[0] for c in result.candidates]
    factors = [c[1] for c in result.candidates]
    assert result.chosen == choose_candidate(result.agreement, result.candidate_labels, 3, groups=groups,
                                             factors=factors)
    # the noise network alone agrees least, and is not kept; the kept labels find the slabs
    noise_alone = [i for i, (s, _, _) in enumerate(result.candidates) if s == (1,)]
    assert support[noise_alone].max() < support.max() and result.chosen not in noise_alone
    assert nmi(truth, result.labels) > 0.9
    subset, weight, restart = result.candidates[result.chosen]
    expected = merge_segment(joint_features([[good, noise, good][i] for i in subset], volume, weight), good, 3,
                             seed=RESTART_SEED_STEP * restart, spacing=volume.geometry.spacing_zyx, n_init=1)
    np.testing.assert_array_equal(result.labels, expected)  # the chosen candidate's own labels
    again = consensus_segment([good, noise, good], volume, 3, seed=0)
    np.testing.assert_array_equal(again.labels, result.labels)


def test_consensus_restarts_are_members_of_one_ensemble() -> None:
    """Every (networks, weight) pair is clustered from ``restarts`` k-means seeds; restart 0 is the one-restart
    consensus's candidate, and the medoid is taken over all restarts together."""
    volume, good, noise, _ = _blocks_case(seed=1)
    one = consensus_segment([good, noise], volume, 3, seed=4, weights=(0.5, 2.0), restarts=1)
    three = consensus_segment([good, noise], volume, 3, seed=4, weights=(0.5, 2.0), restarts=3)
    assert len(three.candidates) == 3 * len(one.candidates) == 18
    first = [i for i, (_, _, r) in enumerate(three.candidates) if r == 0]
    assert [three.candidates[i][:2] for i in first] == [c[:2] for c in one.candidates]
    for i, j in zip(first, range(len(one.candidates))):
        np.testing.assert_array_equal(three.candidate_labels[i], one.candidate_labels[j])
    np.testing.assert_allclose(three.agreement[np.ix_(first, first)], one.agreement)
    groups, factors = [c[0] for c in three.candidates], [c[1] for c in three.candidates]
    assert three.chosen == choose_candidate(three.agreement, three.candidate_labels, 3, groups=groups,
                                            factors=factors)
    # a restart is merge_segment from its own seed
    subset, weight, restart = three.candidates[5]
    assert restart == 2
    expected = merge_segment(joint_features([[good, noise][i] for i in subset], volume, weight), good, 3,
                             seed=4 + 2 * RESTART_SEED_STEP, spacing=volume.geometry.spacing_zyx, n_init=1)
    np.testing.assert_array_equal(three.candidate_labels[5], expected)


def test_consensus_candidates_do_not_depend_on_the_number_of_workers() -> None:
    """The candidates run side by side, one per torch thread; each is seeded on its own, so one worker and two
    give the same candidates, agreement and choice."""
    volume, good, noise, _ = _blocks_case(seed=1)
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            runs.append(consensus_segment([good, noise], volume, 3, seed=4, weights=(0.5, 2.0), restarts=2))
    finally:
        torch.set_num_threads(threads)
    one, two = runs
    assert one.candidates == two.candidates and one.chosen == two.chosen
    for a, b in zip(one.candidate_labels, two.candidate_labels):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(one.agreement, two.agreement)


def test_choose_candidate_passes_over_a_class_that_vanished() -> None:
    """The medoid by NMI favours a split into k - 1 classes plus a speck; such candidates are left out."""
    rng = np.random.default_rng(0)
    n, tissue = 3000, np.repeat([0, 1, 2], [1400, 1100, 500])
    speck = int(MIN_CLASS_SHARE * n) - 1  # one position short of the share
    merged = np.where(tissue == 2, 1, tissue)
    merged[rng.choice(n, speck, replace=False)] = 2  # candidate 0: two classes and a speck

    def noisy(labels: np.ndarray, p: float) -> np.ndarray:
        out = labels.copy()
        flip = rng.random(n) < p
        out[flip] = rng.integers(0, 3, flip.sum())
        return out

    labels = [merged, noisy(tissue, 0.3), noisy(tissue, 0.35), np.where(tissue == 2, 0, tissue)]
    agreement = np.array([[nmi(a, b) for b in labels] for a in labels])
    support = (agreement.sum(axis=1) - 1) / 3
    assert int(np.argmax(support)) in (0, 3)  # the plain medoid keeps a two-class candidate
    assert choose_candidate(agreement, labels, 3) == 1  # the medoid of candidates 1 and 2; tie to the first
    # a speck of exactly the share counts as a class: candidates 0-2 take part
    held = merged.copy()
    held[np.flatnonzero(held != 2)[:1]] = 2
    within = (agreement[:3, :3].sum(axis=1) - 1) / 2
    assert choose_candidate(agreement, [held, *labels[1:]], 3) == int(np.argmax(within))
    # no candidate keeps every class: the medoid of all of them
    assert choose_candidate(agreement, [labels[0], labels[3], labels[0], labels[3]], 3) == int(np.argmax(support))
    assert choose_candidate(agreement[:1, :1], labels[:1], 3) == 0


def test_support_counts_only_the_other_subsets() -> None:
    """Candidates of one feature space share its errors: counted only against the other spaces, a wrong split
    that one space yields many times over no longer outvotes the split that two other spaces each find."""
    rng = np.random.default_rng(1)
    n, tissue = 3000, np.repeat([0, 1, 2], [1500, 1200, 300])
    wrong = np.where(tissue == 2, 1, tissue)  # the small tissue merged into its neighbour ...
    wrong[:700] = 2  # ... and the large one split in two

    def noisy(labels: np.ndarray, p: float) -> np.ndarray:
        out = labels.copy()
        flip = rng.random(n) < p
        out[flip] = rng.integers(0, 3, flip.sum())
        return out

    # the two-network space yields the wrong split four times over, identically; each network alone finds the
    # tissues, with noise of its own in every candidate
    labels = [wrong] * 4 + [noisy(tissue, 0.05) for _ in range(8)]
    groups = [(0, 1)] * 4 + [(0,)] * 4 + [(1,)] * 4
    agreement = np.array([[nmi(a, b) for b in labels] for a in labels])
    plain, across = seg_support(agreement), seg_support(agreement, groups)
    np.testing.assert_allclose(plain, (agreement.sum(axis=1) - 1) / 11)
    np.testing.assert_allclose(across[4], np.mean(agreement[4, [0, 1, 2, 3, 8, 9, 10, 11]]))
    assert choose_candidate(agreement, labels, 3) == 0  # the plain medoid: the first copy of the wrong split
    chosen = choose_candidate(agreement, labels, 3, groups=groups)
    assert chosen >= 4 and nmi(tissue, labels[chosen]) > 0.8 > nmi(tissue, wrong)
    # one group: every other candidate counts; one candidate: support 1
    np.testing.assert_allclose(seg_support(agreement, ["a"] * 10), plain)
    assert seg_support(np.ones((1, 1)), ["a"]).tolist() == [1.0]


def test_consensus_cross_support_ablation() -> None:
    """``cross_support=False`` keeps the plain medoid of all candidates, the rule before."""
    volume, good, noise, _ = _blocks_case(seed=1)
    plain = consensus_segment([good, noise], volume, 3, seed=4, weights=(0.5, 2.0), cross_support=False)
    assert plain.chosen == choose_candidate(plain.agreement, plain.candidate_labels, 3)
    factors = [c[1] for c in plain.candidates]
    across = consensus_segment([good, noise], volume, 3, seed=4, weights=(0.5, 2.0))
    groups = [c[0] for c in across.candidates]
    assert across.chosen == choose_candidate(across.agreement, across.candidate_labels, 3, groups=groups,
                                             factors=factors)
    np.testing.assert_allclose(plain.agreement, across.agreement)


def _tight_and_spread() -> tuple[np.ndarray, list[int], list[float]]:
    """The agreement of 30 candidates shaped as the anchored networks' on the intensity phantom (seed 2): two
    networks x factors 0.25-4 x 3 restarts; the factors 2 and 4 agree at 0.93 with each other and 0.6 with the
    small factors; the small factors spread (0.55-0.75 among each other); factor 1 lies between everything
    (0.8)."""
    factors = [f for _ in range(2) for f in CONSENSUS_WEIGHTS for _ in range(3)]
    groups = [net for net in range(2) for _ in range(15)]
    f = np.array(factors)
    large, middle = f >= 2, f == 1
    rng = np.random.default_rng(3)
    agreement = rng.uniform(0.55, 0.75, (30, 30))
    agreement[np.ix_(large, large)] = 0.93
    agreement[np.ix_(large, ~large)] = agreement[np.ix_(~large, large)] = 0.6
    agreement[middle, :] = agreement[:, middle] = 0.8
    agreement = np.triu(agreement, 1) + np.triu(agreement, 1).T + np.eye(30)
    return agreement, groups, factors


def test_weight_agreement_is_the_mean_over_pairs_of_other_subsets() -> None:
    agreement, groups, factors = _tight_and_spread()
    stability = weight_agreement(agreement, factors, groups)
    assert list(stability) == list(CONSENSUS_WEIGHTS)
    f, g = np.array(factors), np.array(groups)
    for factor, value in stability.items():
        members = np.flatnonzero(f == factor)
        pairs = [agreement[i, j] for i in members for j in members if g[i] != g[j]]
        assert len(pairs) == 18 and value == pytest.approx(np.mean(pairs))
    assert stability[2.0] == stability[4.0] == pytest.approx(0.93) and stability[1.0] == pytest.approx(0.8)
    # one group (one network): restarts on the same features are no perturbation, and no pair counts
    assert weight_agreement(agreement, factors, None) == weight_agreement(agreement, factors, [0] * 30) == {}
    assert weight_agreement(agreement[[0, 15]][:, [0, 15]], [0.25, 0.25], groups[:1] + groups[15:16]) == {
        0.25: agreement[0, 15]}


def test_choose_candidate_keeps_what_the_other_networks_reproduce_at_its_factor() -> None:
    """The medoid of all candidates falls between a tight group and a spread, on factor 1; the candidate that the
    other network reproduces best at its own factor is one of the tight group, as the factor-first rule's."""
    agreement, groups, factors = _tight_and_spread()
    labels = [np.repeat([0, 1, 2], 100)] * 30
    assert factors[choose_candidate(agreement, labels, 3, groups=groups)] == 1.0
    chosen = choose_candidate(agreement, labels, 3, groups=groups, factors=factors)
    own = seg_support(agreement, groups, factors)
    assert factors[chosen] in (2.0, 4.0) and own[chosen] == own.max() == pytest.approx(0.93)
    assert chosen == int(np.argmax(own))  # ties: the first
    before = choose_candidate(agreement, labels, 3, groups=groups, factors=factors, choice="factor-first")
    tight = [i for i, f in enumerate(factors) if f == 2.0]  # 2 and 4 tie: the smaller factor
    assert before in tight and seg_support(agreement, groups)[before] == max(seg_support(agreement, groups)[tight])
    assert choose_candidate(agreement, labels, 3, groups=groups, factors=factors, choice="medoid") == \
        choose_candidate(agreement, labels, 3, groups=groups)
    # candidates that lose a class take no part: neither as candidates nor as what another one is judged by
    vanished = [np.repeat([0, 1, 2], [150, 149, 1]) if f >= 2 else labels[0] for f in factors]
    for choice in ("reproduced", "factor-first"):
        assert factors[choose_candidate(agreement, vanished, 3, groups=groups, factors=factors, choice=choice)] == 1.0
    # one network, or a single candidate, leaves nothing to compare across networks: the medoid
    assert choose_candidate(agreement, labels, 3, factors=factors) == choose_candidate(agreement, labels, 3)
    assert choose_candidate(agreement, labels, 3, groups=[0] * 30, factors=factors) == choose_candidate(
        agreement, labels, 3)
    assert choose_candidate(agreement[:1, :1], labels[:1], 3, groups=groups[:1], factors=factors[:1]) == 0
    with pytest.raises(ValueError, match="choice"):
        choose_candidate(agreement, labels, 3, groups=groups, factors=factors, choice="best")


def test_choose_candidate_does_not_decide_a_factor_by_a_hair() -> None:
    """Factor a's candidates agree moderately across the two networks (0.80 every pair); factor b's spread
    around one pair that reproduces well (0.95), and average a hair less (0.794). The factor-first rule keeps
    one of factor a's; the candidate that the other network reproduces best at its own factor is factor b's
    reproduced one (the lung phantom, seed 0: ``docs/method.md`` 5.8)."""
    groups = [0, 0, 0, 1, 1, 1] * 2
    factors = [1.0] * 6 + [2.0] * 6
    agreement = np.full((12, 12), 0.6)
    agreement[:6, :6] = 0.8
    b = np.array([[1.0, 0.8, 0.8, 0.95, 0.85, 0.85], [0.8, 1.0, 0.8, 0.85, 0.70, 0.70],
                  [0.8, 0.8, 1.0, 0.85, 0.70, 0.70], [0.95, 0.85, 0.85, 1.0, 0.8, 0.8],
                  [0.85, 0.70, 0.70, 0.8, 1.0, 0.8], [0.85, 0.70, 0.70, 0.8, 0.8, 1.0]])
    agreement[6:, 6:] = b
    np.fill_diagonal(agreement, 1.0)
    labels = [np.repeat([0, 1, 2], 100)] * 12
    stability = weight_agreement(agreement, factors, groups)
    assert stability[1.0] == pytest.approx(0.8) and stability[2.0] == pytest.approx(7.15 / 9)
    assert choose_candidate(agreement, labels, 3, groups=groups, factors=factors, choice="factor-first") < 6
    assert choose_candidate(agreement, labels, 3, groups=groups, factors=factors) == 6
    np.testing.assert_allclose(seg_support(agreement, groups, factors)[[0, 6, 7]], [0.8, 2.65 / 3, 2.25 / 3])


def test_consensus_choice_ablations() -> None:
    """``choice="medoid"`` keeps the medoid of every factor's candidates, and ``"factor-first"`` the medoid of
    the factor that agrees best across networks: the rules before."""
    volume, good, noise, _ = _blocks_case(seed=1)
    for choice in ("medoid", "factor-first"):
        before = consensus_segment([good, noise], volume, 3, seed=4, weights=(0.5, 2.0), choice=choice)
        groups, factors = [c[0] for c in before.candidates], [c[1] for c in before.candidates]
        assert before.chosen == choose_candidate(before.agreement, before.candidate_labels, 3, groups=groups,
                                                 factors=factors, choice=choice)
    with pytest.raises(ValueError, match="choice must be one of"):
        consensus_segment([good, noise], volume, 3, seed=4, weights=(0.5, 2.0), choice="vote")


def test_consensus_candidates_and_bad_weights() -> None:
    volume, good, _, _ = _blocks_case()
    single = consensus_segment([good], volume, 3, seed=0, intensity_weight=0.0, restarts=1)
    assert single.candidates == [((0,), 0.0, 0)] and single.chosen == 0 and single.support.tolist() == [1.0]
    doubled = consensus_segment([good], volume, 3, intensity_weight=2.0, weights=(0.5, 1.0, 2.0), restarts=1)
    assert doubled.candidates == [((0,), 1.0, 0), ((0,), 2.0, 0), ((0,), 4.0, 0)]
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="restarts"):
            consensus_segment([good], volume, 3, restarts=bad)
    for bad in ((), (1.0, -1.0), (float("nan"),)):
        with pytest.raises(ValueError, match="weights"):
            consensus_segment([good], volume, 3, weights=bad)
    with pytest.raises(ValueError, match="intensity_weight"):
        consensus_segment([good], volume, 3, intensity_weight=-1.0)


def test_refine_labels_moves_a_blocky_border_to_the_intensity_edge() -> None:
    rng = np.random.default_rng(0)
    truth = np.where(np.arange(32) < 16, 1, 2)[None, None, :] * np.ones((20, 20, 1), np.uint8)  # edge at x = 16
    data = np.where(truth == 1, -1.0, 1.0) + 0.3 * rng.normal(size=truth.shape)
    mask = np.ones(truth.shape, bool)
    mask[:2] = False  # outside the mask stays 0
    volume = Volume.from_array(data.astype(np.float32)).with_mask(mask)
    coarse = np.where(np.arange(32) < 19, 1, 2)[None, None, :] * np.ones((20, 20, 1), np.uint8)  # 3 voxels off
    coarse[~mask] = 0
    refined = refine_labels(coarse, volume, stride=2)
    assert refined.dtype == coarse.dtype and (refined[~mask] == 0).all()
    # the coarse border is 3 columns of 32 off (0.906); the refined one at most the column whose 3³ box
    # straddles the edge
    assert (refined[mask] == truth[mask]).mean() > 0.96 > (coarse[mask] == truth[mask]).mean() + 0.05


def test_refine_labels_keeps_classes_that_do_not_differ_in_intensity() -> None:
    rng = np.random.default_rng(1)
    volume = Volume.from_array(rng.normal(size=(20, 20, 32)).astype(np.float32))  # two halves, same statistics
    coarse = np.where(np.arange(32) < 16, 1, 2)[None, None, :] * np.ones((20, 20, 1), np.uint8)
    refined = refine_labels(coarse, volume, stride=2)
    assert (refined == coarse).mean() > 0.97  # only voxels at the border, where the prior is even, may move
    far = np.abs(np.arange(32) - 15.5) > 4
    np.testing.assert_array_equal(refined[..., far], coarse[..., far])
    one = np.ones_like(coarse)
    np.testing.assert_array_equal(refine_labels(one, volume, stride=2), one)
    for bad in (0.0, 1.0, -1.0):
        with pytest.raises(ValueError, match="floor"):
            refine_labels(coarse, volume, stride=2, floor=bad)


def _weak_border(seed: int = 0) -> tuple[Volume, np.ndarray, np.ndarray]:
    """Two halves whose voxels differ by a third of their noise, and coarse labels 3 columns off the edge."""
    rng = np.random.default_rng(seed)
    truth = np.where(np.arange(32) < 16, 1, 2)[None, None, :] * np.ones((20, 20, 1), np.uint8)
    data = np.where(truth == 1, -0.25, 0.25) + 1.5 * rng.normal(size=truth.shape)
    coarse = np.where(np.arange(32) < 19, 1, 2)[None, None, :] * np.ones((20, 20, 1), np.uint8)
    return Volume.from_array(data.astype(np.float32)), truth, coarse


def test_refinement_places_a_weak_border_with_its_neighbourhood_not_voxel_by_voxel(monkeypatch) -> None:
    """Where one voxel's 3³ box is weak evidence, voxels that decide alone leave a speckle of small islands near
    the border (4 to 14 connected pieces in these four volumes); the Potts model between neighbours (Atropos' 0.3)
    leaves each class one piece, and both place more voxels right than the coarse labels."""
    from scipy import ndimage

    from jule3d import clustering

    assert clustering.REFINE_SMOOTHING == 0.3
    for seed in range(4):
        volume, truth, coarse = _weak_border(seed)
        coupled = refine_labels(coarse, volume, stride=2)
        with monkeypatch.context() as patch:
            patch.setattr(clustering, "REFINE_SMOOTHING", 0.0)
            alone = refine_labels(coarse, volume, stride=2)
        pieces = [sum(ndimage.label(labels == c)[1] for c in (1, 2)) for labels in (coupled, alone)]
        assert pieces[0] == 2 < 4 <= pieces[1]
        assert min((coupled == truth).mean(), (alone == truth).mean()) > (coarse == truth).mean()


def _intensity_blocks() -> tuple[Volume, np.ndarray, np.ndarray]:
    """The 48³ intensity phantom, its labels, and coarse labels in blocks of 4 voxels (90.6 % of them right)."""
    phantom = make_phantom(shape=(48, 48, 48), variant="intensity", seed=0)
    volume, truth = phantom.volume, phantom.labels
    blocks = truth[::4, ::4, ::4].repeat(4, axis=0).repeat(4, axis=1).repeat(4, axis=2)
    return volume, truth, np.where(volume.foreground(), np.maximum(blocks, 1), 0).astype(np.uint8)


def test_the_refinement_reads_the_box_median_so_borders_follow_the_intensity_edge(monkeypatch) -> None:
    """Coarse labels in blocks of 4 voxels over the intensity phantom, refined in one pass: from the 3³ median,
    the borders move to the intensity edges (98.9 % of the voxels right, from 90.6 %); from the 3³ mean, the
    refinement before, a box across a border mixes both sides, and fewer are right (97.4 %)."""
    from jule3d import clustering

    volume, truth, coarse = _intensity_blocks()
    monkeypatch.setattr(clustering, "REFINE_PASSES", 1)
    assert clustering.REFINE_STATISTIC == "median"
    median = refine_labels(coarse, volume, stride=2)
    monkeypatch.setattr(clustering, "REFINE_STATISTIC", "mean")
    mean = refine_labels(coarse, volume, stride=2)
    inside = truth > 0
    right = [float((labels[inside] == truth[inside]).mean()) for labels in (coarse, median, mean)]
    assert right[1] > 0.985 and right[1] > right[2] + 0.01 and right[2] > right[0]


def test_the_refinement_runs_a_second_pass_on_the_first_pass_labels(monkeypatch) -> None:
    """The second pass takes the first pass's labels as its prior and refits the densities to them, so the
    default is the one-pass refinement applied to its own output. On the intensity phantom's 4-voxel blocks it
    places 99.3 % of the voxels right, against 98.9 % after one pass."""
    from jule3d import clustering

    volume, truth, coarse = _intensity_blocks()
    assert clustering.REFINE_PASSES == 2
    two = refine_labels(coarse, volume, stride=2)
    monkeypatch.setattr(clustering, "REFINE_PASSES", 1)
    one = refine_labels(coarse, volume, stride=2)
    np.testing.assert_array_equal(two, refine_labels(one, volume, stride=2))
    inside = truth > 0
    right = [float((labels[inside] == truth[inside]).mean()) for labels in (one, two)]
    assert right[1] > 0.99 and right[1] > right[0] + 0.002


def test_a_second_pass_that_would_empty_a_class_is_not_kept(monkeypatch) -> None:
    """:func:`fit_refinement` keeps the passes that keep every class of the coarse labels: where the second would
    give every voxel one class, the first pass's model and labels are the result."""
    from jule3d import clustering
    from jule3d.clustering import RefineModel, fit_refinement, local_evidence

    volume, _, coarse = _weak_border(0)
    foreground = volume.foreground()
    inside = np.where(foreground, coarse.astype(np.int64) - 1, -1)
    local = local_evidence(volume, 3, np.nonzero(foreground))
    labels, calls = RefineModel._labels, []

    def second_empties(self, *args, **options):
        calls.append(self)
        out = labels(self, *args, **options)
        return np.zeros_like(out) if len(calls) > 1 else out

    monkeypatch.setattr(RefineModel, "_labels", second_empties)
    passes, (classes,) = fit_refinement([volume], [inside], [foreground], [local], 2, 2, 3, 1e-3)
    assert len(calls) == clustering.REFINE_PASSES == 2 and passes == (calls[0],)
    monkeypatch.setattr(RefineModel, "_labels", labels)
    np.testing.assert_array_equal(classes, calls[0].apply(inside, volume, foreground, local))
    assert set(np.unique(classes)) == {0, 1}


def test_refining_part_of_a_volume_labels_it_as_the_whole_volume_does() -> None:
    """A chunk refines its own voxels with :data:`REFINE_CONTEXT` voxels of context around them for the Potts
    model, so its labels are those of the whole volume bar where ICM's reach crosses the context."""
    from jule3d.clustering import RefineModel, local_evidence

    volume, _, coarse = _weak_border(1)
    foreground = volume.foreground()
    inside = coarse[foreground].astype(np.int64) - 1
    local = local_evidence(volume, 3, np.nonzero(foreground))
    model = RefineModel.fit(local, inside, 2, stride=2, window=3, floor=1e-3)
    whole = model.apply(coarse - 1, volume, foreground, local).reshape(coarse.shape)
    keep = np.zeros(coarse.shape, bool)
    keep[5:15, 5:15, 10:22] = True  # across the border
    part = model.apply(coarse - 1, volume, keep)
    assert (part == whole[keep]).mean() > 0.99
    with pytest.raises(ValueError, match="beta"):
        RefineModel.fit(local, inside, 2, stride=2, window=3, floor=1e-3, beta=-1.0)
    for bad in (lambda: RefineModel.fit(local, inside, 2, stride=2, window=3, floor=1e-3, statistic="mode"),
                lambda: local_evidence(volume, 3, np.nonzero(foreground), "mode")):
        with pytest.raises(ValueError, match="statistic"):
            bad()


def test_refining_part_of_a_volume_in_two_passes_labels_it_as_the_whole_volume_does() -> None:
    """The first pass labels every voxel within the second pass's reach of a chunk's own (:func:`refine_classes`),
    so the chunk's labels are the whole volume's; with the first pass on the chunk's voxels alone, the second
    pass's prior is cut at the chunk's faces, and fewer agree (97.1 % here)."""
    from jule3d.clustering import fit_refinement, local_evidence, refine_classes

    volume, _, coarse = _weak_border(1)
    foreground = volume.foreground()
    inside = np.where(foreground, coarse.astype(np.int64) - 1, -1)
    local = local_evidence(volume, 3, np.nonzero(foreground))
    passes, (whole,) = fit_refinement([volume], [inside], [foreground], [local], 2, 2, 3, 1e-3)
    assert len(passes) == 2
    keep = np.zeros(coarse.shape, bool)
    keep[5:15, 5:15, 10:22] = True  # across the border
    on_whole = np.full(coarse.shape, -1)
    on_whole[foreground] = whole
    alone = inside
    for model in passes:  # each pass on the chunk's voxels alone
        labels = np.full(coarse.shape, -1)
        labels[keep] = model.apply(alone, volume, keep)
        alone = labels
    agree = [float((part == on_whole[keep]).mean()) for part in (refine_classes(passes, inside, volume, keep),
                                                                  alone[keep])]
    assert agree[0] > 0.99 and agree[0] > agree[1] + 0.01


def test_a_pass_runs_on_the_box_of_the_voxels_it_reads_and_labels_as_on_the_whole_block(monkeypatch) -> None:
    """Each pass runs on the bounding box of the voxels it reads (:func:`jule3d.clustering._crop_box`: the
    prior's Gaussian and the box statistics reach no further; the box starts at even indices so that ICM's parity
    classes stay the block's), and the passes read one computation of the evidence: the labels are those of the
    passes run on the whole block, bit for bit."""
    from jule3d import clustering
    from jule3d.clustering import fit_refinement, local_evidence, refine_classes

    rng = np.random.default_rng(0)
    x = np.arange(96)
    truth = np.where((x < 30) | (x > 70), 1, 2)[None, None, :] * np.ones((24, 24, 1), np.uint8)
    data = np.where(truth == 1, -0.4, 0.4) + 2.0 * rng.normal(size=truth.shape)
    volume = Volume.from_array(data.astype(np.float32))
    coarse = np.where((x < 33) | (x > 66), 0, 1)[None, None, :] * np.ones((24, 24, 1), np.int64)
    foreground = volume.foreground()
    passes, _ = fit_refinement([volume], [coarse], [foreground], [local_evidence(volume, 3, np.nonzero(foreground))],
                               2, 2, 3, 1e-3)
    assert len(passes) == 2
    for start in (59, 60):  # the first pass's box would start at an odd index, then at an even one; from an odd
        # one, 3 of 2,160 voxels change here (ICM visits the parity classes in another order)
        keep = np.zeros(truth.shape, bool)
        keep[3:15, 5:20, start:start + 12] = True
        calls = []
        evidence = clustering.local_evidence
        monkeypatch.setattr(clustering, "local_evidence", lambda *a, **o: calls.append(1) or evidence(*a, **o))
        cropped = refine_classes(passes, coarse, volume, keep)
        assert len(calls) == 1, "both passes read one computation of the evidence"
        monkeypatch.setattr(clustering, "_crop_box", lambda mask, margin: tuple(slice(0, n) for n in mask.shape))
        np.testing.assert_array_equal(cropped, refine_classes(passes, coarse, volume, keep))
        monkeypatch.undo()
    assert refine_classes(passes, coarse, volume, np.zeros(truth.shape, bool)).shape == (0,)


def _two_modes_and_one(n: int = 4000) -> tuple[np.ndarray, np.ndarray]:
    """Local means of class 0, half air (0) and half tissue (1), and of class 1, tissue only: ``(N, 1)``, ``(N,)``."""
    rng = np.random.default_rng(0)
    air_or_tissue = np.where(rng.random(n) < 0.5, 0.0, 1.0) + 0.05 * rng.normal(size=n)
    tissue = 1.0 + 0.05 * rng.normal(size=n)
    return np.concatenate([air_or_tissue, tissue])[:, None], np.repeat([0, 1], n)


def test_refinement_gives_a_class_of_air_and_tissue_a_mode_at_each() -> None:
    """A class whose voxels are air or tissue has two modes; one Gaussian over both makes a tissue voxel 10 times
    likelier in the neighbouring all-tissue class, so that only a prior above 0.9 keeps it. The mixture leaves a
    factor of 2, the share of tissue in the mixed class."""
    from jule3d.clustering import REFINE_COMPONENTS, RefineModel

    local, labels = _two_modes_and_one()
    mixture = RefineModel.fit(local, labels, 2, stride=2, window=3, floor=1e-3)
    assert REFINE_COMPONENTS == 2 and mixture.means.shape == (2, 2, 1) and mixture.log_weights.shape == (2, 2)
    np.testing.assert_allclose(np.sort(mixture.means[0, :, 0]), [0.0, 1.0], atol=0.01)
    np.testing.assert_allclose(np.exp(mixture.log_weights).sum(axis=1), 1.0)
    one = RefineModel.fit(local, labels, 2, stride=2, window=3, floor=1e-3, components=1)
    tissue_voxel, air_voxel = np.array([[1.0]]), np.array([[0.0]])
    assert np.diff(one.log_likelihood(tissue_voxel)[0])[0] > np.log(10)
    assert np.diff(mixture.log_likelihood(tissue_voxel)[0])[0] == pytest.approx(np.log(2), abs=0.1)
    assert (mixture.log_likelihood(air_voxel).argmax(axis=1) == 0).all()
    with pytest.raises(ValueError, match="components"):
        RefineModel.fit(local, labels, 2, stride=2, window=3, floor=1e-3, components=0)


def test_refinement_with_one_component_is_each_class_mean_and_covariance() -> None:
    """One component: a class's mean and unbiased covariance (plus the ridge); a class with too few voxels for a
    mixture is one Gaussian too, and a class of no more voxels than C + 1 takes the pooled covariance."""
    from jule3d.clustering import RefineModel

    rng = np.random.default_rng(2)
    local = rng.normal(size=(300, 2))
    labels = np.repeat([0, 1, 2], [247, 50, 3])  # 50 < 10 * 2 * (2 + 1): too few for a mixture of two
    for components in (1, None):
        model = RefineModel.fit(local, labels, 3, 2, 3, 1e-3, components=components)
        ridge = 1e-6 * np.trace(np.cov(local, rowvar=False)) / 2 * np.eye(2)
        np.testing.assert_allclose(model.means[1, 0], local[labels == 1].mean(axis=0))
        own = np.cov(local[labels == 1], rowvar=False)
        np.testing.assert_allclose(model.inverses[1, 0], np.linalg.inv(own + ridge))
        np.testing.assert_allclose(model.inverses[2, 0], np.linalg.inv(np.cov(local, rowvar=False) + ridge))
        assert model.log_weights[1, 0] == 0.0 and np.isneginf(model.log_weights[1, 1:]).all()
    assert np.isfinite(RefineModel.fit(local, labels, 3, 2, 3, 1e-3).log_weights[0]).all()  # 247 voxels: a mixture


def test_refinement_fit_does_not_depend_on_the_order_of_the_classes() -> None:
    """Classes larger than the fitted sample are subsampled; renumbering the classes permutes the fitted densities
    and changes nothing else (the refinement of ``refine_labels``, classes in intensity order, and of
    ``fit_phase2``, classes in candidate order, are the same)."""
    from unittest import mock

    from jule3d import clustering

    rng = np.random.default_rng(4)
    local = np.concatenate([rng.normal(loc, 0.3, size=(400, 2)) for loc in (0.0, 1.0, 2.0)])
    labels = np.repeat([0, 1, 2], 400)
    renumber = np.array([2, 0, 1])  # class c becomes renumber[c]
    with mock.patch.object(clustering, "REFINE_FIT_ROWS", 150):
        model = clustering.RefineModel.fit(local, labels, 3, 2, 3, 1e-3)
        renumbered = clustering.RefineModel.fit(local, renumber[labels], 3, 2, 3, 1e-3)
    for c in range(3):
        np.testing.assert_array_equal(renumbered.means[renumber[c]], model.means[c])
        np.testing.assert_array_equal(renumbered.log_weights[renumber[c]], model.log_weights[c])
    np.testing.assert_array_equal(renumbered.log_likelihood(local)[:, renumber], model.log_likelihood(local))


def test_a_class_of_one_value_is_one_gaussian_and_fits_without_warnings() -> None:
    """A class whose local means are all equal (a saturated or clipped region) has no second mode to fit."""
    import warnings

    from jule3d.clustering import RefineModel

    rng = np.random.default_rng(3)
    local = np.concatenate([np.zeros(1000), rng.normal(size=1000)])[:, None]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = RefineModel.fit(local, np.repeat([0, 1], 1000), 2, stride=2, window=3, floor=1e-3)
    assert np.isneginf(model.log_weights[0, 1:]).all() and np.isfinite(model.log_weights[1]).all()
    assert (model.log_likelihood(np.zeros((1, 1))).argmax(axis=1) == 0).all()


def _saved_phase2(**refine) -> dict:
    """A Phase 2 model of one network and two classes as :meth:`Phase2Model.to_dict` writes it, with ``refine``."""
    return {"networks": np.array([0]), "means": np.zeros((1, 2)), "scales": np.ones(1), "local_factor": 0.0,
            "centers": np.eye(2, dtype=np.float32), "group": np.arange(2), "margin": np.nan, "beta": 0.0,
            "scale": 1.0, "order": np.array([1, 2]), "window": 3, **refine}


def test_a_saved_phase2_model_keeps_every_pass_of_its_refinement() -> None:
    """:meth:`Phase2Model.to_dict` stacks the passes' densities; :meth:`Phase2Model.from_dict` gives each back."""
    from jule3d.clustering import Phase2Model, RefineModel

    local, labels = _two_modes_and_one(500)
    model = Phase2Model.from_dict(_saved_phase2())
    assert model.refine == ()
    model.refine = (RefineModel.fit(local, labels, 2, stride=2, window=3, floor=1e-3),
                    RefineModel.fit(local, 1 - labels, 2, stride=2, window=3, floor=1e-3))
    loaded = Phase2Model.from_dict(model.to_dict()).refine
    assert len(loaded) == 2 and model.to_dict()["refine_passes"] == 2
    for before, after in zip(model.refine, loaded):
        np.testing.assert_array_equal(after.log_likelihood(local), before.log_likelihood(local))
        assert (after.stride, after.window, after.floor, after.beta, after.statistic) == (2, 3, 1e-3, 0.3, "median")
    assert not np.array_equal(loaded[0].log_likelihood(local), loaded[1].log_likelihood(local))


def test_a_phase2_model_saved_with_one_gaussian_per_class_loads_as_one_component() -> None:
    """A Phase 2 model saved before the mixtures (``(k, C)`` means, no weights) refines as it did, in one pass."""
    from jule3d.clustering import Phase2Model, RefineModel

    local, labels = _two_modes_and_one(500)
    one = RefineModel.fit(local, labels, 2, stride=2, window=3, floor=1e-3, components=1)
    saved = _saved_phase2(refine_means=one.means[:, 0], refine_inverses=one.inverses[:, 0],
                          refine_logdets=one.logdets[:, 0], refine_stride=2, refine_floor=1e-3)
    (loaded,) = Phase2Model.from_dict(saved).refine
    np.testing.assert_array_equal(loaded.log_likelihood(local), one.log_likelihood(local))
    (again,) = Phase2Model.from_dict(Phase2Model.from_dict(saved).to_dict()).refine
    np.testing.assert_array_equal(again.log_likelihood(local), one.log_likelihood(local))
    assert one.beta == 0.3 and loaded.beta == again.beta == 0.0  # saved before the voxel Potts model: none
    assert one.statistic == "median" and loaded.statistic == again.statistic == "mean"  # saved before the median


def test_segment_trains_the_presets_networks_with_distinct_seeds(phantom, monkeypatch) -> None:
    seen: list[tuple[int, str]] = []
    calls: list[dict] = []

    def fake_training(patches, config, progress=True, **options):
        seen.append((config.seed, config.net))
        net = config.network_config(in_channels=patches.patches.shape[1], patch_size=patches.patch_size)
        return type("Result", (), {"model": JuleNet3D(net, seed=config.seed), "history": []})()

    def fake_label_grids(grids, volume, n_clusters, **options):
        calls.append({"n_models": len(grids), **options})
        return np.zeros(volume.shape, np.uint8)

    monkeypatch.setattr(jule3d.jule, "train_jule", fake_training)
    monkeypatch.setattr(jule3d.segmentation, "grid_features", lambda model, volume, **options: model)
    monkeypatch.setattr(jule3d.segmentation, "label_grids", fake_label_grids)
    segment(phantom.volume, 3, seed=3, n_patches=20, progress=False)
    assert seen == [(6, "fast"), (7, "fast")] and calls[-1]["n_models"] == 2 and calls[-1]["phase2"] == "consensus"
    seen.clear()
    segment(phantom.volume, 3, seed=3, preset="paper", n_patches=20, progress=False)
    assert seen == [(3, "paper")] and calls[-1]["n_models"] == 1 and calls[-1]["phase2"] == "kmeans"
    seen.clear()
    segment(phantom.volume, 3, seed=1, n_networks=3, phase2="kmeans", n_patches=20, progress=False)
    assert seen == [(3, "fast"), (4, "fast"), (5, "fast")] and calls[-1]["phase2"] == "kmeans"
    for bad in ({"n_networks": 0}, {"phase2": "agdl"}, {"preset": "slow"}):
        with pytest.raises(ValueError):
            segment(phantom.volume, 3, progress=False, **bad)


def test_fit_uses_given_patches_for_network_0_and_its_own_for_the_rest(phantom, tmp_path) -> None:
    from jule3d.patches import sample_patches

    volume = normalize_intensity(phantom.volume)
    first = sample_patches(volume, 60, patch_size=17, seed=network_seeds(2, 2)[0])
    first.labels = phantom.labels[tuple(first.centers.T)]
    segmenter = JuleSegmenter(seed=2, epochs_per_period=1, final_epochs=1, k_s=5, n_patches=60)
    results = segmenter.fit(volume, patches=first, ground_truth=phantom.labels, checkpoint_dir=tmp_path).results_
    assert [r.config.seed for r in results] == network_seeds(2, 2) == [4, 5]
    assert all(r.history[-1].get("nmi") is not None for r in results), "both track the NMI at their centres"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["network_0", "network_1"]
    again = JuleSegmenter(seed=2, epochs_per_period=1, final_epochs=1, k_s=5, n_patches=60).fit(volume).results_
    np.testing.assert_array_equal(again[0].labels, results[0].labels)  # the given patches are network 0's own
