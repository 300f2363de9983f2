"""Baseline segmenters on small synthetic volumes with known intensity classes."""

from __future__ import annotations

import importlib
import importlib.util

import numpy as np
import pytest

from jule3d.baselines import (
    BASELINES,
    OPTIONAL_PACKAGES,
    atropos_segmentation,
    hmrf_segmentation,
    kmeans_intensity,
    local_mean_kmeans,
    missing_package,
    multi_otsu,
    run_baseline,
    slic_kmeans,
)
from jule3d.labels import masked_box_mean, masked_box_median, order_labels_by_intensity
from jule3d.metrics import evaluate, matched_dice, nmi
from jule3d.volume import Volume

SHAPE = (32, 32, 32)
CLASS_MEANS = np.array([0.0, 1.0, 2.0])  # class i + 1 has mean CLASS_MEANS[i]
#: Methods that label each voxel from its own intensity (and, for atropos/hmrf, its neighbours' labels);
#: localmean blurs class boundaries by its 9³ box by design and has its own tests below, and kanezaki (a CNN
#: trained per volume) has its own tests in test_kanezaki.py.
CLASSICAL = sorted(set(BASELINES) - {"kanezaki"})
PER_VOXEL = sorted(set(CLASSICAL) - {"localmean"})


def _needs_package(name: str) -> None:
    """Skip the test when the baseline ``name`` needs an optional package that is not installed."""
    if name in OPTIONAL_PACKAGES:
        pytest.importorskip(OPTIONAL_PACKAGES[name][0])


def _truth() -> np.ndarray:
    """Three balanced slabs with wavy boundaries, labelled 1..3 (dimmest to brightest), in a ball mask."""
    z, y, x = np.mgrid[tuple(slice(0, s) for s in SHAPE)]
    n = SHAPE[2]
    labels = 1 + np.digitize(x + 3 * np.sin(y / 4.0) + 2 * np.cos(z / 5.0), [n / 3, 2 * n / 3])
    ball = (z - 15.5) ** 2 + (y - 15.5) ** 2 + (x - 15.5) ** 2 < 15.0**2
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
    return Volume.from_array(image.astype(np.float32), spacing=(0.5, 0.5, 1.0), mask=truth > 0)


@pytest.fixture(scope="module")
def two_channel(truth: np.ndarray) -> Volume:
    """Channel 0 separates class 1 from {2, 3}; only channel 1 separates class 2 from class 3."""
    rng = np.random.default_rng(1)
    inside = np.maximum(truth, 1) - 1
    first = np.array([0.0, 2.0, 2.0])[inside] + rng.normal(0.0, 0.2, SHAPE)
    second = np.array([1.0, 0.0, 2.0])[inside] + rng.normal(0.0, 0.2, SHAPE)
    return Volume.from_array(np.stack([first, second]).astype(np.float32), mask=truth > 0)


@pytest.mark.parametrize("name", PER_VOXEL)
def test_baselines_recover_intensity_classes_with_ordered_ids(
    name: str, volume: Volume, truth: np.ndarray
) -> None:
    _needs_package(name)
    labels = run_baseline(name, volume, 3, seed=0)
    assert labels.shape == SHAPE and labels.dtype == np.uint8
    assert not labels[truth == 0].any()  # 0 exactly outside the mask
    assert set(np.unique(labels[truth > 0])) == {1, 2, 3}
    result = evaluate(truth, labels, truth > 0)
    assert result["nmi"] > 0.8
    assert result["dice_mean"] > 0.9
    # ids follow the first-channel mean intensity, which is the order of the true classes
    means = [volume.data[0][labels == k].mean() for k in (1, 2, 3)]
    assert means[0] < means[1] < means[2]
    assert matched_dice(truth, labels, truth > 0)["mapping"] == {1: 1, 2: 2, 3: 3}


@pytest.mark.parametrize("name", CLASSICAL)
def test_baselines_are_deterministic_under_a_seed(name: str, volume: Volume) -> None:
    _needs_package(name)
    np.testing.assert_array_equal(
        run_baseline(name, volume, 3, seed=3), run_baseline(name, volume, 3, seed=3)
    )


@pytest.mark.parametrize("name", ["kmeans", "gmm"])
def test_sampled_fit_keeps_ids_stable_across_seeds(name: str, volume: Volume, truth: np.ndarray) -> None:
    a = run_baseline(name, volume, 3, seed=0, max_samples=2000)
    b = run_baseline(name, volume, 3, seed=1, max_samples=2000)
    assert nmi(truth, a, truth > 0) > 0.8
    assert np.mean(a[truth > 0] == b[truth > 0]) > 0.98  # same ids, not just the same partition


@pytest.mark.parametrize("name", ["kmeans", "gmm", "slic", "localmean"])
def test_multichannel_methods_use_every_channel(name: str, two_channel: Volume, truth: np.ndarray) -> None:
    _needs_package(name)
    threshold = 0.7 if name == "localmean" else 0.8  # its box blurs the wavy boundaries (0.75 on one channel)
    assert nmi(truth, run_baseline(name, two_channel, 3), truth > 0) > threshold


@pytest.mark.parametrize("name", ["otsu", "hmrf"])
def test_single_channel_methods_use_the_first_channel_only(name: str, two_channel: Volume) -> None:
    _needs_package(name)
    first = Volume.from_array(two_channel.data[:1], mask=two_channel.mask)
    np.testing.assert_array_equal(run_baseline(name, two_channel, 3), run_baseline(name, first, 3))


def test_otsu_uses_the_first_channel_only(two_channel: Volume, truth: np.ndarray) -> None:
    labels = multi_otsu(two_channel, 3)
    dice = matched_dice(truth, labels, truth > 0)
    assert dice["per_class"][1] > 0.95  # channel 0 separates class 1 ...
    assert nmi(truth, labels, truth > 0) < 0.8  # ... but cannot tell class 2 from class 3


def test_mask_defaults_to_volume_mask_then_to_all_voxels(volume: Volume, truth: np.ndarray) -> None:
    explicit = kmeans_intensity(volume, 3, mask=truth > 0)
    np.testing.assert_array_equal(kmeans_intensity(volume, 3), explicit)
    everything = kmeans_intensity(volume.with_mask(None), 3)
    assert everything.all()  # no mask: every voxel labelled
    assert (everything[truth == 0] == 1).all()  # the dark outside gets the dimmest id
    half = np.zeros(SHAPE, dtype=bool)
    half[:16] = True
    labels = kmeans_intensity(volume, 3, mask=half)
    assert not labels[16:].any() and labels[:16].all()


def test_slic_options(volume: Volume, truth: np.ndarray) -> None:
    labels = slic_kmeans(volume, 3, n_segments=40, compactness=0.2)
    assert nmi(truth, labels, truth > 0) > 0.8
    with pytest.raises(ValueError, match="raise n_segments"):
        slic_kmeans(volume, 3, n_segments=1)
    with pytest.raises(ValueError, match="compactness"):
        slic_kmeans(volume, 3, compactness=0.0)


def test_order_labels_by_intensity_hand_example() -> None:
    labels = np.array([5, 5, 9, 9, 2, 7]).reshape(1, 2, 3)
    intensity = np.array([3.0, 3.0, 1.0, 1.0, 2.0, 100.0]).reshape(1, 2, 3)
    mask = np.array([True, True, True, True, True, False]).reshape(1, 2, 3)
    out = order_labels_by_intensity(labels, intensity, mask)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out.ravel(), [3, 3, 1, 1, 2, 0])
    # a 4D intensity is read through its first channel; no mask labels every voxel
    stacked = np.stack([intensity, -intensity])
    np.testing.assert_array_equal(order_labels_by_intensity(labels, stacked).ravel(), [3, 3, 1, 1, 2, 4])


def test_order_labels_ties_keep_id_order_and_many_clusters_use_uint16() -> None:
    labels = np.array([4, 1, 3]).reshape(1, 1, 3)
    out = order_labels_by_intensity(labels, np.zeros((1, 1, 3)))
    np.testing.assert_array_equal(out.ravel(), [3, 1, 2])
    many = np.arange(300).reshape(3, 10, 10)
    wide = order_labels_by_intensity(many, -many.astype(float))
    assert wide.dtype == np.uint16
    np.testing.assert_array_equal(wide, 300 - many)


def test_order_labels_bad_inputs() -> None:
    labels = np.zeros((2, 3, 4), dtype=int)
    with pytest.raises(ValueError, match="intensity shape"):
        order_labels_by_intensity(labels, np.zeros((2, 3, 5)))
    with pytest.raises(ValueError, match="labels must be 3D"):
        order_labels_by_intensity(labels[0], np.zeros((3, 4)))
    with pytest.raises(ValueError, match="mask is empty"):
        order_labels_by_intensity(labels, np.zeros(labels.shape), np.zeros(labels.shape, dtype=bool))


def test_kanezaki_is_registered_and_runs_through_run_baseline(volume: Volume) -> None:
    labels = run_baseline("kanezaki", volume, 3, seed=0, max_iter=3, n_channels=8)
    assert labels.shape == SHAPE and set(np.unique(labels)) <= {0, 1, 2, 3}
    with pytest.raises(ValueError, match="n_classes"):
        run_baseline("kanezaki", volume, 1)


@pytest.mark.parametrize("name", CLASSICAL)
def test_bad_inputs_raise(name: str, volume: Volume) -> None:
    _needs_package(name)
    for bad in (1, 0, 2.5, True):
        with pytest.raises(ValueError, match="n_classes"):
            run_baseline(name, volume, bad)
    with pytest.raises(ValueError, match="mask is empty"):
        run_baseline(name, volume, 3, mask=np.zeros(SHAPE, dtype=bool))
    with pytest.raises(ValueError, match="mask shape"):
        run_baseline(name, volume, 3, mask=np.ones((4, 4, 4), dtype=bool))
    two_values = Volume.from_array(np.where(np.arange(32) < 16, 0.0, 1.0) * np.ones(SHAPE))
    with pytest.raises(ValueError, match="n_classes=3 exceeds the 2 distinct"):
        run_baseline(name, two_values, 3)
    if name == "atropos":  # two constant classes: Atropos refuses their singular covariances
        with pytest.raises(RuntimeError, match="singular"):
            run_baseline(name, two_values, 2)
    else:
        assert set(np.unique(run_baseline(name, two_values, 2))) == {1, 2}
    broken = np.array(volume.data)
    broken[0, 16, 16, 16] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        run_baseline(name, Volume.from_array(broken, mask=volume.mask), 3)


def test_unknown_baseline_lists_the_valid_names(volume: Volume) -> None:
    with pytest.raises(ValueError, match="atropos.*gmm.*hmrf.*kmeans.*localmean.*otsu.*slic"):
        run_baseline("watershed", volume, 3)
    with pytest.raises(ValueError, match="name must be one of"):
        missing_package("watershed")


def test_sampling_options_are_checked(volume: Volume) -> None:
    with pytest.raises(ValueError, match="max_samples"):
        kmeans_intensity(volume, 3, max_samples=0)
    with pytest.raises(ValueError, match="nbins"):
        multi_otsu(volume, 3, nbins=0)


@pytest.fixture(scope="module")
def phantoms() -> dict[str, object]:
    phantom = pytest.importorskip("jule3d.phantom", reason="jule3d.phantom is not available")
    return {v: phantom.make_phantom((32, 32, 32), n_classes=3, variant=v, seed=0) for v in ("intensity", "texture")}


@pytest.mark.parametrize("name", PER_VOXEL)
def test_phantom_intensity_variant_is_separable_and_texture_variant_is_not(
    name: str, phantoms: dict[str, object]
) -> None:
    _needs_package(name)
    scores = {}
    for variant, ph in phantoms.items():
        labels = run_baseline(name, ph.volume, 3)
        scores[variant] = nmi(ph.labels, labels, ph.volume.mask)
        if variant == "intensity":  # class means rise with the class id, so do the baseline ids
            assert matched_dice(ph.labels, labels, ph.volume.mask)["mapping"] == {1: 1, 2: 2, 3: 3}
    # class means 0.8 apart under a texture std of 0.2: per-voxel methods separate them well (NMI ~0.85),
    # while on the texture variant they see nothing
    assert scores["intensity"] > 0.7
    assert scores["texture"] < 0.15


# --------------------------------------------------------------------------------------------------
# the peers: local-mean k-means, ANTs Atropos, dipy HMRF

PEER_SHAPE = (20, 24, 28)  # not a cube, so a transposed axis would show


def _peer_case(noise: float) -> tuple[Volume, np.ndarray]:
    """Three wavy slabs (means 0, 1, 2 plus Gaussian noise) in an ellipsoid mask off the border, with
    anisotropic spacing; returns the volume and its ground truth (0 outside the mask)."""
    z, y, x = np.mgrid[tuple(slice(0, s) for s in PEER_SHAPE)]
    n = PEER_SHAPE[2]
    slabs = 1 + np.digitize(x + 2 * np.sin(y / 3.0), [n / 3, 2 * n / 3])
    inside = ((z - 9.5) / 9) ** 2 + ((y - 11.5) / 11) ** 2 + ((x - 13.5) / 13) ** 2 < 1
    image = (slabs - 1 + np.random.default_rng(0).normal(0.0, noise, PEER_SHAPE)).astype(np.float32)
    return Volume.from_array(image, spacing=(2.0, 1.0, 0.5), mask=inside), np.where(inside, slabs, 0)


@pytest.mark.parametrize("name", ["atropos", "hmrf"])
def test_mrf_peers_recover_classes_inside_and_without_a_mask(name: str) -> None:
    _needs_package(name)
    volume, truth = _peer_case(noise=0.2)
    labels = run_baseline(name, volume, 3)
    assert labels.shape == PEER_SHAPE and labels.dtype == np.uint8
    assert not labels[truth == 0].any()
    assert nmi(truth, labels, truth > 0) > 0.9
    assert matched_dice(truth, labels, truth > 0)["mapping"] == {1: 1, 2: 2, 3: 3}  # ids by intensity
    # no mask: the whole box is tissue, and dipy's background class must not take any of it
    everything = run_baseline(name, volume.with_mask(None), 3)
    assert set(np.unique(everything)) == {1, 2, 3}
    assert nmi(truth, everything, truth > 0) > 0.9


@pytest.mark.parametrize("name", ["atropos", "hmrf"])
def test_mrf_prior_beats_voxel_kmeans_on_noisy_classes(name: str) -> None:
    _needs_package(name)
    volume, truth = _peer_case(noise=0.3)
    baseline = nmi(truth, kmeans_intensity(volume, 3), truth > 0)
    assert nmi(truth, run_baseline(name, volume, 3), truth > 0) > baseline + 0.04


@pytest.mark.parametrize("name", ["atropos", "hmrf"])
def test_mrf_peers_take_no_seed(name: str) -> None:
    _needs_package(name)
    volume, _ = _peer_case(noise=0.3)
    np.testing.assert_array_equal(run_baseline(name, volume, 3, seed=0), run_baseline(name, volume, 3, seed=1))


def test_atropos_mixture_uses_every_channel_but_initialises_on_the_first(
    two_channel: Volume, truth: np.ndarray
) -> None:
    pytest.importorskip("ants")
    rng = np.random.default_rng(2)
    classes = np.array([0.0, 1.0, 2.0])[np.maximum(truth, 1) - 1]
    noisy = np.stack([classes + rng.normal(0.0, 0.5, SHAPE) for _ in range(2)]).astype(np.float32)
    both = atropos_segmentation(Volume.from_array(noisy, mask=truth > 0), 3)
    one = atropos_segmentation(Volume.from_array(noisy[:1], mask=truth > 0), 3)
    assert nmi(truth, both, truth > 0) > nmi(truth, one, truth > 0) + 0.1
    # Atropos' k-means runs on the first channel only: classes that only the second channel separates
    # stay merged, and are found once that channel comes first
    swapped = Volume.from_array(np.asarray(two_channel.data)[::-1].copy(), mask=two_channel.mask)
    assert nmi(truth, atropos_segmentation(two_channel, 3), truth > 0) < 0.7
    assert nmi(truth, atropos_segmentation(swapped, 3), truth > 0) > 0.9


def test_atropos_options() -> None:
    pytest.importorskip("ants")
    volume, truth = _peer_case(noise=0.3)
    plain = atropos_segmentation(volume, 3, mrf_smoothing=0.0)
    smooth = atropos_segmentation(volume, 3, mrf_smoothing=0.3, mrf_radius=2, n_iterations=3)
    assert nmi(truth, smooth, truth > 0) > nmi(truth, plain, truth > 0)
    # the voxel spacing reaches Atropos: its MRF weighs neighbours by their inverse distance in mm
    isotropic = Volume.from_array(np.asarray(volume.data), mask=volume.mask)
    assert not np.array_equal(atropos_segmentation(volume, 3), atropos_segmentation(isotropic, 3))
    for options, name in (
        ({"mrf_smoothing": -0.1}, "mrf_smoothing"),
        ({"mrf_smoothing": float("nan")}, "mrf_smoothing"),
        ({"mrf_smoothing": float("inf")}, "mrf_smoothing"),
        ({"mrf_radius": 0}, "mrf_radius"),
        ({"mrf_radius": 1.5}, "mrf_radius"),
        ({"n_iterations": 0}, "n_iterations"),
    ):
        with pytest.raises(ValueError, match=name):
            atropos_segmentation(volume, 3, **options)


def test_hmrf_options() -> None:
    pytest.importorskip("dipy")
    volume, truth = _peer_case(noise=0.3)
    plain = hmrf_segmentation(volume, 3, beta=0.0)
    assert nmi(truth, hmrf_segmentation(volume, 3, beta=0.3), truth > 0) > nmi(truth, plain, truth > 0)
    for options, name in (
        ({"beta": -1.0}, "beta"),
        ({"beta": float("nan")}, "beta"),
        ({"beta": float("inf")}, "beta"),
        ({"tolerance": float("nan")}, "tolerance"),
        ({"max_iter": 0}, "max_iter"),
        ({"max_iter": 10.0}, "max_iter"),
    ):
        with pytest.raises(ValueError, match=name):
            hmrf_segmentation(volume, 3, **options)


@pytest.mark.parametrize(
    ("name", "module", "package"), [("atropos", "ants", "antspyx"), ("hmrf", "dipy.segment.tissue", "dipy")]
)
def test_missing_optional_package_says_what_to_install(
    name: str, module: str, package: str, volume: Volume, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = importlib.import_module

    def without(target: str, *args: object) -> object:
        if target == module:
            raise ModuleNotFoundError(f"No module named {target!r}")
        return real(target, *args)

    monkeypatch.setattr(importlib, "import_module", without)
    with pytest.raises(ImportError, match=f"pip install {package}"):
        run_baseline(name, volume, 3)
    monkeypatch.setattr(importlib.util, "find_spec", lambda target: None)
    assert missing_package(name) == package
    assert missing_package("kmeans") is None


def _lung_like() -> tuple[Volume, np.ndarray]:
    """Three slabs of air (0) and tissue (1) voxels, tissue fractions 0.2, 0.5, 0.8: every voxel is air or
    tissue whatever its class, only the local fraction tells the classes apart (as on the lung phantom)."""
    shape = (24, 24, 48)
    truth = np.broadcast_to(1 + np.digitize(np.arange(48), [16, 32]), shape).astype(np.uint8)
    rng = np.random.default_rng(0)
    tissue = rng.random(shape) < np.array([0.2, 0.5, 0.8])[truth - 1]
    return Volume.from_array((tissue + rng.normal(0.0, 0.1, shape)).astype(np.float32)), truth


def test_local_mean_separates_what_voxel_intensity_cannot() -> None:
    volume, truth = _lung_like()
    labels = local_mean_kmeans(volume, 3)
    assert nmi(truth, labels) > 0.85
    assert nmi(truth, kmeans_intensity(volume, 3)) < 0.2
    # the class with the least tissue is the dimmest: ids follow the mean voxel intensity
    assert matched_dice(truth, labels)["mapping"] == {1: 1, 2: 2, 3: 3}
    np.testing.assert_array_equal(labels, local_mean_kmeans(volume, 3))
    half = np.zeros(truth.shape, dtype=bool)
    half[:, :, :24] = True  # classes 1 and half of 2
    inside = local_mean_kmeans(volume, 2, mask=half)
    assert not inside[~half].any() and nmi(truth, inside, half) > 0.8


def test_local_mean_options(volume: Volume) -> None:
    for options, name in (({"window": 0}, "window"), ({"window": 2.5}, "window"), ({"n_init": 0}, "n_init")):
        with pytest.raises(ValueError, match=name):
            local_mean_kmeans(volume, 3, **options)
    assert set(np.unique(local_mean_kmeans(volume, 3, window=1)[volume.mask])) == {1, 2, 3}


def test_masked_box_mean_counts_only_mask_voxels() -> None:
    rng = np.random.default_rng(0)
    data = rng.normal(size=(2, 5, 6, 7)).astype(np.float32)
    mask = rng.random((5, 6, 7)) < 0.6
    data[:, ~mask] = np.nan  # values outside the mask must not matter
    positions = np.nonzero(mask)
    means = masked_box_mean(data, mask, 3, positions)
    assert means.shape == (2, int(mask.sum())) and means.dtype == np.float32
    for i, (z, y, x) in enumerate(zip(*positions)):
        box = tuple(slice(max(c - 1, 0), c + 2) for c in (z, y, x))
        expected = np.nanmean(data[(slice(None),) + box].reshape(2, -1), axis=1)
        np.testing.assert_allclose(means[:, i], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("window", [1, 2, 3, 4])
def test_masked_box_median_counts_only_mask_voxels(window: int) -> None:
    """Every box's median over its mask voxels alone (the upper middle value of an even count), whether the box
    lies wholly inside the mask (scipy's median filter) or reaches past it (gathered voxel by voxel)."""
    rng = np.random.default_rng(window)
    data = rng.normal(size=(2, 9, 10, 11)).astype(np.float32)
    mask = rng.random((9, 10, 11)) < 0.6
    mask[2:7, 2:8, 2:9] = True  # boxes wholly inside the mask too
    data[:, ~mask] = np.nan  # values outside the mask must not matter
    positions = np.nonzero(mask)
    medians = masked_box_median(data, mask, window, positions)
    assert medians.shape == (2, int(mask.sum())) and medians.dtype == np.float32
    before = window // 2  # the box of masked_box_mean: one voxel more before the centre than after for even sides
    for i, (z, y, x) in enumerate(zip(*positions)):
        box = tuple(slice(max(c - before, 0), c + window - before) for c in (z, y, x))
        values = data[(slice(None),) + box].reshape(2, -1)
        for c in range(2):
            inside = np.sort(values[c][~np.isnan(values[c])])
            assert medians[c, i] == inside[len(inside) // 2]


def test_a_box_median_keeps_a_step_where_the_box_mean_blurs_it() -> None:
    """Across a step between two noiseless halves, the box mean of the voxels next to the step lies between the
    halves; the median is the value of the side that holds most of the box."""
    data = np.zeros((1, 4, 4, 8), dtype=np.float32)
    data[..., 4:] = 1.0
    mask = np.ones((4, 4, 8), dtype=bool)
    positions = np.nonzero(mask)
    medians = masked_box_median(data, mask, 3, positions)[0]
    means = masked_box_mean(data, mask, 3, positions)[0]
    np.testing.assert_array_equal(medians, data[0][positions])
    assert np.all((means[positions[2] == 3] > 0) & (means[positions[2] == 4] < 1))
