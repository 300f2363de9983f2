"""Tests of the texture and lung phantoms: determinism, ground truth, equal intensity statistics, difficulty."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from skimage.filters import threshold_multiotsu
from sklearn.cluster import KMeans
from sklearn.metrics import normalized_mutual_info_score

from jule3d.app.cli import main
from jule3d.patches import sample_patches
from jule3d.phantom import DEFAULT_SPACING, LUNG_CLASS_NAMES, TEXTURE_NAMES, make_phantom, write_phantom

SMALL = (64, 64, 64)


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(shape=SMALL, n_classes=3, seed=3)


@pytest.fixture(scope="module")
def default_phantom():
    return make_phantom()


def _tissue(ph) -> tuple[np.ndarray, np.ndarray]:
    """Intensities and labels of the specimen voxels."""
    inside = ph.labels > 0
    return ph.volume.data[0][inside], ph.labels[inside]


def _texture_features(image: np.ndarray, mask: np.ndarray, scale: float = 5.0) -> np.ndarray:
    """Local energies of directional derivatives and of two band-pass filters, averaged in the mask."""
    image = np.where(mask, image, image[mask].mean()).astype(np.float32)
    weight = ndimage.gaussian_filter(mask.astype(np.float32), scale) + 1e-6
    responses = [ndimage.gaussian_filter1d(image, 1.0, axis=a, order=1) for a in range(3)]
    responses += [ndimage.gaussian_filter(image, s1) - ndimage.gaussian_filter(image, s2)
                  for s1, s2 in ((0.7, 1.5), (1.5, 3.0))]
    energies = [ndimage.gaussian_filter(r * r * mask, scale)[mask] / weight[mask] for r in responses]
    features = np.log(np.stack(energies, axis=1) + 1e-6)
    return (features - features.mean(0)) / features.std(0)


def _kmeans_nmi(features: np.ndarray, truth: np.ndarray, k: int) -> float:
    model = KMeans(k, n_init=4, random_state=0).fit(features[::5])
    return normalized_mutual_info_score(truth, model.predict(features))


def test_shapes_dtypes_and_ground_truth(phantom):
    volume, labels = phantom.volume, phantom.labels
    assert volume.data.shape == (1,) + SMALL and volume.data.dtype == np.float32
    assert labels.shape == SMALL and labels.dtype == np.uint8
    assert set(np.unique(labels)) == {0, 1, 2, 3}
    np.testing.assert_array_equal(volume.mask, labels > 0)
    assert phantom.class_names == TEXTURE_NAMES[:3] and phantom.n_classes == 3
    assert volume.spacing == DEFAULT_SPACING
    # Centred on the physical origin: first and last voxel centres are symmetric.
    assert volume.geometry.origin == pytest.approx(tuple(-(n - 1) / 2 * 0.5 for n in SMALL))
    # Specimen in air: no tissue on the outer faces of the volume.
    for axis in range(3):
        assert not np.take(labels, [0, -1], axis=axis).any()


def test_same_seed_same_arrays_other_seed_different():
    a = make_phantom(shape=(32, 36, 40), seed=5)
    b = make_phantom(shape=(32, 36, 40), seed=5)
    c = make_phantom(shape=(32, 36, 40), seed=6)
    np.testing.assert_array_equal(a.volume.data, b.volume.data)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert not np.array_equal(a.volume.data, c.volume.data)
    assert not np.array_equal(a.labels, c.labels)


@pytest.mark.parametrize("k", [2, 3, 6])
def test_classes_are_balanced(k):
    ph = make_phantom(shape=(48, 48, 48), n_classes=k, seed=1)
    counts = np.bincount(ph.labels[ph.labels > 0], minlength=k + 1)[1:]
    fractions = counts / counts.sum()
    assert fractions.min() > 0.6 / k and fractions.max() < 1.4 / k, fractions


def test_regions_hold_several_whole_patches(default_phantom):
    """Every class region of the default phantom contains many 27³ cubes of that class only."""
    ph = default_phantom
    for c in range(1, ph.n_classes + 1):
        only_c = ph.volume.with_mask(ph.labels == c)
        patches = sample_patches(only_c, 20, patch_size=27, min_foreground=1.0, labels=ph.labels)
        assert np.all(patches.labels == c)


@pytest.mark.parametrize("k", [3, 6])
def test_texture_classes_share_mean_and_std(k):
    ph = make_phantom(shape=SMALL, n_classes=k, seed=2)
    values, truth = _tissue(ph)
    means = np.array([values[truth == c].mean() for c in range(1, k + 1)])
    stds = np.array([values[truth == c].std() for c in range(1, k + 1)])
    assert means.max() / means.min() < 1.05, means
    assert stds.max() / stds.min() < 1.05, stds


def test_without_noise_and_bias_every_class_is_exactly_standardised():
    ph = make_phantom(shape=(40, 40, 40), n_classes=4, seed=0, noise=0.0, bias=0.0)
    values, truth = _tissue(ph)
    for c in range(1, 5):
        v = values[truth == c]
        assert v.mean() == pytest.approx(1.0, abs=1e-4)
        assert v.std() == pytest.approx(0.2, rel=1e-3)
    assert np.all(ph.volume.data[0][ph.labels == 0] == 0.0)


def test_intensity_variant_spreads_class_means():
    ph = make_phantom(shape=SMALL, variant="intensity", seed=2)
    values, truth = _tissue(ph)
    means = [values[truth == c].mean() for c in (1, 2, 3)]
    assert means == pytest.approx([1.0, 1.8, 2.6], abs=0.05)


def test_air_is_darker_and_the_automatic_mask_finds_the_specimen(phantom):
    from jule3d.mask import foreground_mask

    image, specimen = phantom.volume.data[0], phantom.labels > 0
    assert image[specimen].mean() - image[~specimen].mean() > 10 * image[~specimen].std()
    auto = foreground_mask(image)
    dice = 2 * (auto & specimen).sum() / (auto.sum() + specimen.sum())
    assert dice > 0.99


def test_intensity_only_methods_score_near_zero_on_the_texture_variant(phantom):
    values, truth = _tissue(phantom)
    kmeans = KMeans(3, n_init=3, random_state=0).fit(values[::5, None]).predict(values[:, None])
    otsu = np.digitize(values, threshold_multiotsu(values, classes=3))
    assert normalized_mutual_info_score(truth, kmeans) < 0.05
    assert normalized_mutual_info_score(truth, otsu) < 0.05


def test_intensity_only_methods_do_see_the_intensity_variant():
    ph = make_phantom(shape=SMALL, variant="intensity", seed=3)
    values, truth = _tissue(ph)
    kmeans = KMeans(3, n_init=3, random_state=0).fit(values[::5, None]).predict(values[:, None])
    assert normalized_mutual_info_score(truth, kmeans) > 0.7


def test_texture_features_separate_the_classes(default_phantom):
    """Local filter energies at patch scale + k-means recover the classes the intensities hide."""
    ph = default_phantom
    inside = ph.labels > 0
    features = _texture_features(ph.volume.data[0], inside)
    assert _kmeans_nmi(features, ph.labels[inside], ph.n_classes) > 0.5


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"shape": (32, 32)}, "shape"),
        ({"shape": (8, 32, 32)}, "shape"),
        ({"n_classes": 1}, "n_classes"),
        ({"n_classes": 10}, "n_classes"),
        ({"n_classes": 2.5}, "n_classes"),
        ({"variant": "colour"}, "variant"),
        ({"noise": -0.1}, "noise"),
        ({"bias": 1.0}, "bias"),
        ({"regions_per_class": 0}, "regions_per_class"),
        ({"textures": ("foam", "fibres")}, "textures"),
        ({"textures": ("foam", "foam", "fibres")}, "textures"),
        ({"textures": ("foam", "fibres", "plaid")}, "textures"),
        ({"textures": "foam"}, "textures"),
        ({"variant": "lung", "textures": ("foam", "fibres", "lamellae")}, "textures"),
    ],
)
def test_bad_arguments_are_named(kwargs, name):
    with pytest.raises(ValueError, match=name):
        make_phantom(**kwargs)


def test_textures_choose_each_class_texture():
    """Other textures give a phantom of the same layout and intensity statistics whose classes hold those textures."""
    default = make_phantom(shape=(32, 32, 32), seed=3)
    chosen = ("fine_grain", "fibres", "foam")
    other = make_phantom(shape=(32, 32, 32), seed=3, textures=chosen)
    assert other.class_names == chosen
    np.testing.assert_array_equal(other.labels, default.labels)
    # Class 1 holds fine grain in both, drawn from its class's stream: the same voxels; the others differ.
    inside = default.labels == 1
    np.testing.assert_array_equal(other.volume.data[0][inside], default.volume.data[0][inside])
    for c in (2, 3):
        values = other.volume.data[0][other.labels == c]
        assert not np.array_equal(values, default.volume.data[0][default.labels == c])
        assert values.mean() == pytest.approx(1.0, abs=0.03) and values.std() == pytest.approx(0.2, abs=0.02)


def test_textures_of_distances_to_random_sites_hide_in_intensity_and_show_in_texture():
    """Beads, cell walls and rods (distances to random sites, not filtered noise) share the intensity statistics
    of every texture, and intensity alone cannot separate them; local filter energies can, given the labels
    (held-out half), which k-means on the same energies does less well: a harder unsupervised case."""
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
    from sklearn.metrics import balanced_accuracy_score

    ph = make_phantom(shape=SMALL, seed=4, textures=("beads", "cells", "rods"))
    assert ph.class_names == ("beads", "cells", "rods")
    values, truth = _tissue(ph)
    for c in (1, 2, 3):
        assert values[truth == c].mean() == pytest.approx(1.0, abs=0.03)
        assert values[truth == c].std() == pytest.approx(0.2, abs=0.02)
    kmeans = KMeans(3, n_init=3, random_state=0).fit(values[::5, None]).predict(values[:, None])
    assert normalized_mutual_info_score(truth, kmeans) < 0.05
    features = _texture_features(ph.volume.data[0], ph.labels > 0)
    probe = LinearDiscriminantAnalysis().fit(features[::2], truth[::2])
    assert balanced_accuracy_score(truth[1::2], probe.predict(features[1::2])) > 0.75


@pytest.mark.parametrize("name", ["beads", "cells", "rods"])
def test_site_distance_fields_are_the_same_in_slabs(monkeypatch, name):
    """The grid is queried in z-slabs of at most ``_QUERY_CHUNK`` voxels: the field must not depend on the slabs,
    and it is minus a distance: never above 0, and below -1 away from the sites."""
    from jule3d import phantom as module

    shape = (11, 13, 12)
    whole = module._texture_field(name, shape, np.random.default_rng(7))
    monkeypatch.setattr(module, "_QUERY_CHUNK", 2 * 13 * 12 + 5)  # slabs of two z-planes, the last one plane
    slabs = module._texture_field(name, shape, np.random.default_rng(7))
    np.testing.assert_array_equal(slabs, whole)
    assert whole.max() <= 0 and whole.min() < -1


def test_beads_are_minus_the_distance_to_the_nearest_site():
    from jule3d import phantom as module

    shape = (9, 10, 11)
    field = module._texture_field("beads", shape, np.random.default_rng(3))
    sites = module._stratified_seeds(shape, module.BEAD_SPACING, np.random.default_rng(3))
    grid = np.argwhere(np.ones(shape, dtype=bool)).astype(np.float64)
    brute = np.sqrt(((grid[:, None, :] - sites[None]) ** 2).sum(-1)).min(1)
    np.testing.assert_allclose(field.ravel(), -brute, rtol=1e-6)


def test_several_regions_per_class():
    ph = make_phantom(shape=(48, 48, 48), n_classes=2, regions_per_class=3, seed=4)
    counts = np.bincount(ph.labels[ph.labels > 0])[1:]
    assert len(counts) == 2 and counts.min() / counts.max() > 0.5


def test_write_phantom_round_trip(tmp_path):
    from jule3d.io import load_volume

    out, lab = tmp_path / "ph.nii.gz", tmp_path / "ph_labels.nii.gz"
    ph = write_phantom(out, lab, shape=(32, 32, 32), seed=1)
    image = load_volume(out, normalize=False, foreground=None)
    labels = load_volume(lab, normalize=False, foreground=None)
    assert image.geometry.matches(ph.volume.geometry) and labels.geometry.matches(image.geometry)
    np.testing.assert_array_equal(image.data[0], ph.volume.data[0])
    np.testing.assert_array_equal(labels.data[0], ph.labels)


def test_write_phantom_refuses_existing_files_before_writing(tmp_path):
    out, lab = tmp_path / "ph.nii.gz", tmp_path / "ph_labels.nii.gz"
    lab.write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="labels_path"):
        write_phantom(out, lab, shape=(32, 32, 32))
    assert not out.exists() and lab.read_bytes() == b"keep me"
    with pytest.raises(ValueError, match="same file"):
        write_phantom(out, out, shape=(32, 32, 32))
    with pytest.raises(FileNotFoundError, match="out_path"):
        write_phantom(tmp_path / "missing" / "ph.nii.gz", shape=(32, 32, 32))


def test_cli_writes_volume_and_labels_with_identical_geometry(tmp_path, capsys):
    from jule3d.io import load_volume

    out, lab = tmp_path / "ph.nrrd", tmp_path / "gt.nii.gz"
    argv = ["phantom", str(out), "--labels", str(lab), "--seed", "2", "--shape", "24", "28", "32",
            "--n-classes", "4", "--variant", "intensity"]
    assert main(argv) == 0
    image = load_volume(out)  # automatic mask and normalisation, as a user would load it
    labels = load_volume(lab, normalize=False, foreground=None)
    assert image.shape == (24, 28, 32) and image.spacing == DEFAULT_SPACING
    assert labels.geometry.matches(image.geometry)
    expected = make_phantom(shape=(24, 28, 32), n_classes=4, variant="intensity", seed=2)
    np.testing.assert_array_equal(labels.data[0], expected.labels)
    assert (image.mask == (expected.labels > 0)).mean() > 0.98
    assert main(argv) == 2  # exists, no --overwrite
    assert "exists" in capsys.readouterr().err
    assert main(argv + ["--overwrite"]) == 0


def test_cli_textures_choose_each_class_texture(tmp_path, capsys):
    out = tmp_path / "ph.nii.gz"
    assert main(["phantom", str(out), "--shape", "24", "24", "24", "--textures", "beads", "cells", "rods"]) == 0
    assert "classes beads, cells, rods" in capsys.readouterr().err
    assert main(["phantom", str(tmp_path / "no.nii.gz"), "--shape", "24", "24", "24", "--n-classes", "3",
                 "--textures", "beads", "cells"]) == 2
    assert "textures" in capsys.readouterr().err and not (tmp_path / "no.nii.gz").exists()


# ----------------------------------------------------------------------------------------------
# The lung-specimen phantom (variant="lung")
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lung():
    return make_phantom(shape=SMALL, variant="lung", seed=3)


@pytest.fixture(scope="module")
def clean_lung():
    """The same lung phantom without blur, bias field and noise: exactly tissue (1) or air (0)."""
    return make_phantom(shape=SMALL, variant="lung", seed=3, noise=0.0, bias=0.0, blur=0.0)


def test_lung_geometry_labels_and_class_names(lung):
    volume, labels = lung.volume, lung.labels
    assert volume.data.shape == (1,) + SMALL and volume.data.dtype == np.float32
    assert labels.shape == SMALL and labels.dtype == np.uint8
    assert set(np.unique(labels)) == {0, 1, 2, 3}
    np.testing.assert_array_equal(volume.mask, labels > 0)
    assert lung.class_names == LUNG_CLASS_NAMES and lung.n_classes == 3
    assert volume.spacing == DEFAULT_SPACING
    for axis in range(3):
        assert not np.take(labels, [0, -1], axis=axis).any()
    # The same specimen and region partition as the texture phantom: air spaces inside a region carry its class.
    np.testing.assert_array_equal(labels, make_phantom(shape=SMALL, seed=3).labels)


def test_lung_same_seed_same_arrays_other_seed_different():
    a = make_phantom(shape=(32, 36, 40), variant="lung", seed=5)
    b = make_phantom(shape=(32, 36, 40), variant="lung", seed=5)
    c = make_phantom(shape=(32, 36, 40), variant="lung", seed=6)
    np.testing.assert_array_equal(a.volume.data, b.volume.data)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert not np.array_equal(a.volume.data, c.volume.data)


def test_lung_tissue_and_air_have_one_intensity_in_every_class(clean_lung):
    image, labels = clean_lung.volume.data[0], clean_lung.labels
    assert np.all(image[labels == 0] == 0.0)
    for c in (1, 2, 3):
        assert set(np.unique(image[labels == c])) == {0.0, 1.0}, c


def test_lung_air_fractions_normal_over_lepidic_over_invasive(clean_lung):
    image, labels = clean_lung.volume.data[0], clean_lung.labels
    normal, lepidic, invasive = (float((image[labels == c] == 0).mean()) for c in (1, 2, 3))
    assert normal > 0.6 and 0.25 < lepidic < 0.5 and 0 < invasive < 0.08, (normal, lepidic, invasive)


def test_lung_foams_choose_each_class_foam(clean_lung):
    """Other foams give a lung phantom of the same layout whose classes hold those foams; ``LUNG_FOAM`` given
    explicitly is the default."""
    from jule3d.phantom import LUNG_FOAM, Foam

    explicit = make_phantom(shape=SMALL, variant="lung", seed=3, noise=0.0, bias=0.0, blur=0.0, foams=LUNG_FOAM)
    np.testing.assert_array_equal(explicit.volume.data, clean_lung.volume.data)
    # The three classes swapped: each region gets another class's foam, so their air fractions swap with them.
    swapped = make_phantom(shape=SMALL, variant="lung", seed=3, noise=0.0, bias=0.0, blur=0.0,
                           foams=[LUNG_FOAM[2], tuple(LUNG_FOAM[1]), Foam(*LUNG_FOAM[0])])
    np.testing.assert_array_equal(swapped.labels, clean_lung.labels)

    def air(phantom, c):
        return float((phantom.volume.data[0][phantom.labels == c] == 0).mean())

    assert air(swapped, 1) < 0.08 and air(swapped, 3) > 0.6 and 0.25 < air(swapped, 2) < 0.5
    assert air(swapped, 3) == pytest.approx(air(clean_lung, 1), abs=0.1)


def test_lung_normal_alveoli_form_one_connected_air_space(clean_lung):
    """Pores open the alveolar walls: the normal region's air is (almost) one 6-connected component."""
    air = (clean_lung.volume.data[0] == 0) & (clean_lung.labels == 1)
    components, _ = ndimage.label(air)
    assert np.bincount(components[air]).max() > 0.9 * air.sum()


def test_lung_defaults_blur_and_noise_like_a_scan(lung, clean_lung):
    outside = lung.volume.data[0][ndimage.binary_erosion(lung.labels == 0, iterations=3)]
    assert outside.std() == pytest.approx(0.25, rel=0.05)
    assert outside.mean() == pytest.approx(0.0, abs=0.01)
    # Partial volume: the default blur puts many specimen voxels between air and tissue.
    blurred = make_phantom(shape=SMALL, variant="lung", seed=3, noise=0.0, bias=0.0).volume.data[0]
    between = (blurred > 0.05) & (blurred < 0.95)
    assert between[lung.labels > 0].mean() > 0.2
    np.testing.assert_array_equal(lung.labels, clean_lung.labels)


def test_lung_intensity_alone_is_a_weak_cue_the_local_mean_a_strong_one(lung):
    """Moriya 2018's baselines score low; k-means on the mean over a 9³ box in the specimen does not."""
    from jule3d.baselines import kmeans_intensity, multi_otsu
    from jule3d.metrics import nmi
    from jule3d.normalize import normalize_intensity
    from jule3d.volume import Volume

    inside, labels = lung.labels > 0, lung.labels
    normalised = normalize_intensity(lung.volume)
    kmeans = nmi(labels, kmeans_intensity(normalised, 3), inside)
    otsu = nmi(labels, multi_otsu(normalised, 3), inside)
    weight = inside.astype(np.float32)
    total = ndimage.uniform_filter(lung.volume.data[0] * weight, 9, mode="constant")
    local = np.where(inside, total / np.maximum(ndimage.uniform_filter(weight, 9, mode="constant"), 1e-6), 0)
    local_volume = Volume.from_array(local.astype(np.float32), spacing=lung.volume.spacing, mask=inside)
    local_kmeans = nmi(labels, kmeans_intensity(local_volume, 3), inside)
    assert kmeans < 0.2 and otsu < 0.2, (kmeans, otsu)
    assert local_kmeans > 0.5 and local_kmeans > kmeans + 0.3, (local_kmeans, kmeans)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"variant": "lung", "n_classes": 2}, "n_classes"),
        ({"variant": "lung", "n_classes": 4}, "n_classes"),
        ({"variant": "lung", "blur": -0.5}, "blur"),
        ({"blur": float("nan")}, "blur"),
        ({"variant": "lung", "noise": -0.1}, "noise"),
        ({"variant": "lung", "foams": [(10, 1.4, 0.15), (8, 2.6, 0.1)]}, "foams"),
        ({"variant": "lung", "foams": [(10, 1.4, 0.15), (8, 8.0, 0.1), (8, 5.5, 0.0)]}, "foams"),
        ({"variant": "lung", "foams": [(10, 1.4, 1.0), (8, 2.6, 0.1), (8, 5.5, 0.0)]}, "foams"),
        ({"variant": "lung", "foams": [(10, 1.4), (8, 2.6, 0.1), (8, 5.5, 0.0)]}, "foams"),
        ({"variant": "lung", "foams": [(10, "thin", 0.15), (8, 2.6, 0.1), (8, 5.5, 0.0)]}, "foams"),
        ({"variant": "lung", "foams": [(float("nan"), 1.4, 0.15), (8, 2.6, 0.1), (8, 5.5, 0.0)]}, "foams"),
        ({"foams": [(10, 1.4, 0.15), (8, 2.6, 0.1), (8, 5.5, 0.0)]}, "foams"),
    ],
)
def test_lung_bad_arguments_are_named(kwargs, name):
    with pytest.raises(ValueError, match=name):
        make_phantom(shape=(32, 32, 32), **kwargs)


def test_cli_writes_the_lung_variant(tmp_path, capsys):
    from jule3d.io import load_volume

    out, lab = tmp_path / "lung.nii.gz", tmp_path / "lung_labels.nii.gz"
    argv = ["phantom", str(out), "--labels", str(lab), "--seed", "1", "--shape", "32", "32", "32", "--variant", "lung"]
    assert main(argv) == 0
    expected = make_phantom(shape=(32, 32, 32), variant="lung", seed=1)
    np.testing.assert_array_equal(load_volume(out, normalize=False, foreground=None).data[0], expected.volume.data[0])
    np.testing.assert_array_equal(load_volume(lab, normalize=False, foreground=None).data[0], expected.labels)
    assert main(argv + ["--overwrite", "--n-classes", "4"]) == 2
    assert "n_classes must be 3" in capsys.readouterr().err
