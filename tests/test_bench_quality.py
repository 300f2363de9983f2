"""Smoke tests of benchmarks/bench_quality.py: BraTS-ROI crop and classes, tables, the phantom case end to end."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from jule3d.phantom import make_phantom
from jule3d.volume import Volume

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_quality.py"
_spec = importlib.util.spec_from_file_location("bench_quality", _PATH)
bq = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("bench_quality", bq)  # dataclasses look their module up
_spec.loader.exec_module(bq)


def _synthetic_brats() -> tuple[Volume, np.ndarray]:
    """A 40³ two-channel 'brain' (a ball) with a lesion: core 1/3/4 inside oedema 2."""
    z, y, x = np.mgrid[:40, :40, :40]
    brain = (z - 20) ** 2 + (y - 20) ** 2 + (x - 20) ** 2 < 18 ** 2
    labels = np.zeros((40, 40, 40), dtype=np.uint8)
    labels[5:12, 20:30, 22:28] = 2
    labels[7:10, 23:27, 24:26] = 4
    labels[8, 24, 24] = 1
    labels[9, 25, 25] = 3
    labels[0, 0, 0] = 0
    data = np.stack([labels * 1.0, -labels * 0.5]).astype(np.float32)
    return Volume.from_array(data, mask=brain), labels


def test_lesion_box_grows_and_clips() -> None:
    labels = np.zeros((30, 30, 30), dtype=np.uint8)
    labels[2:5, 10:20, 25:28] = 2
    start, stop = bq.lesion_box(labels, margin=4)
    assert start == (0, 6, 21) and stop == (9, 24, 30)
    with pytest.raises(ValueError, match="no positive voxel"):
        bq.lesion_box(np.zeros((5, 5, 5)))
    with pytest.raises(ValueError, match="margin"):
        bq.lesion_box(labels, margin=-1)


def test_ground_truth_classes() -> None:
    gt = bq.brats_ground_truth(np.array([0, 1, 2, 3, 4], dtype=np.float32))
    assert gt.tolist() == [1, 3, 2, 3, 3]  # normal, core, oedema, core, core
    with pytest.raises(ValueError, match="OTMultiClass"):
        bq.brats_ground_truth(np.array([0, 5]))
    with pytest.raises(ValueError, match="OTMultiClass"):
        bq.brats_ground_truth(np.array([0.5]))


def test_brats_roi_crop_mask_and_truth() -> None:
    volume, labels = _synthetic_brats()
    case = bq.brats_roi(volume, labels, margin=3, name="synthetic")
    assert case.volume.shape == (13, 16, 12)  # z 5..11 -> [2, 15), y 20..29 -> [17, 33), x 22..27 -> [19, 31)
    np.testing.assert_array_equal(case.volume.data, volume.data[:, 2:15, 17:33, 19:31])
    np.testing.assert_array_equal(case.evaluation_mask, volume.mask[2:15, 17:33, 19:31])
    assert case.volume.geometry.shape == case.volume.shape
    expected = np.where(labels == 0, 1, np.where(labels == 2, 2, 3))[2:15, 17:33, 19:31]
    np.testing.assert_array_equal(case.ground_truth, expected)
    assert case.n_clusters == 3
    with pytest.raises(ValueError, match="labels shape"):
        bq.brats_roi(volume, labels[1:])


def test_phantom_case_runs_every_method_with_tiny_settings(tmp_path: Path) -> None:
    case = bq.phantom_case("intensity", size=32)
    assert case.evaluation_mask.sum() == (case.ground_truth > 0).sum() > 0
    settings = bq.JuleSettings(n_patches=60, overrides={"epochs_per_period": 1, "final_epochs": 1})
    rows = bq.records(case.name, bq.run_case(case, ["jule3d", "kmeans", "otsu"], settings, seed=0))
    assert [r["method"] for r in rows] == ["jule3d (fast)", "kmeans", "otsu"]
    for r in rows:
        assert 0.0 <= r["nmi"] <= 1.0 and r["seconds"] > 0 and set(r["dice_per_class"]) == {"1", "2", "3"}
    assert rows[1]["nmi"] > 0.5  # the intensity variant is easy for k-means
    twice = rows + [{**r, "case": "again"} for r in rows]
    text = bq.write_report(tmp_path, "phantom", twice, {"machine": "m", "command": "c", "jule": {}}, False)
    assert text.count("| mean of 2 |") == 3 and text.count("| phantom-intensity |") == 3
    saved = json.loads((tmp_path / "quality_phantom.json").read_text())
    assert len(saved["rows"]) == 6
    with pytest.raises(FileExistsError, match="overwrite"):
        bq.write_report(tmp_path, "phantom", rows, {"machine": "m", "command": "c", "jule": {}}, False)


def test_mean_records_and_table() -> None:
    rows = [{"case": c, "method": m, "nmi": v, "nmi_geometric": v, "ari": v, "dice_mean": v, "seconds": 1.0,
             "peak_mb": 2.0} for c, m, v in [("a", "x", 0.2), ("b", "x", 0.4), ("a", "y", 0.1), ("b", "y", 0.3)]]
    means = bq.mean_records(rows)
    assert [(r["method"], round(r["nmi"], 6)) for r in means] == [("x", 0.3), ("y", 0.2)]
    table = bq.markdown_table(means)
    assert table.splitlines()[2].startswith("| mean of 2 | x | 0.300 |")
    assert "sd over seeds" not in table  # one seed: no sd column


def test_several_seeds_give_means_and_sd_over_seeds() -> None:
    # method x: case a 0.2 / 0.4 and case b 0.4 / 0.6 for seeds 0 / 1 -> per-seed case means 0.3 and 0.5
    rows = [{"case": c, "seed": s, "method": "x", "nmi": v, "seconds": 1.0 + s}
            for c, s, v in [("a", 0, 0.2), ("a", 1, 0.4), ("b", 0, 0.4), ("b", 1, 0.6)]]
    per_case = bq.seed_means(rows)
    assert [(r["case"], round(r["nmi"], 6), round(r["nmi_sd"], 6), r["seconds"]) for r in per_case] == [
        ("a", 0.3, round(np.std([0.2, 0.4], ddof=1), 6), 1.5), ("b", 0.5, round(np.std([0.4, 0.6], ddof=1), 6), 1.5)]
    (mean,) = bq.mean_records(rows)
    assert mean["case"] == "mean of 2" and mean["nmi"] == pytest.approx(0.4)
    assert mean["nmi_sd"] == pytest.approx(np.std([0.3, 0.5], ddof=1))
    table = bq.markdown_table(per_case + [mean])
    assert "| NMI sd over seeds |" in table.splitlines()[0]
    assert bq.parse_args(["--seeds", "0", "3"]).seeds == [0, 3]


def test_parse_override_and_arguments() -> None:
    assert bq.parse_override("net_overrides={'patch_size': 13}") == ("net_overrides", {"patch_size": 13})
    assert bq.parse_override("device=cpu") == ("device", "cpu")
    with pytest.raises(argparse.ArgumentTypeError):
        bq.parse_override("epochs")
    args = bq.parse_args(["--dataset", "brats", "-o", "eta=0.5", "--cases", bq.BRATS_CASES[0]])
    assert args.overrides == [("eta", 0.5)] and args.cases == [bq.BRATS_CASES[0]]
    with pytest.raises(SystemExit):
        bq.parse_args(["--cases", "nope"])


def test_worst_seed_is_reported() -> None:
    rows = [{"case": "a", "seed": s, "method": "x", "nmi": v} for s, v in enumerate([0.8, 0.2, 0.9])]
    (row,) = bq.seed_means(rows)
    assert row["nmi_worst"] == 0.2 and "| worst seed NMI |" in bq.markdown_table([row]).splitlines()[0]


def test_suite_arguments_default_to_every_case_method_and_seeds_0_to_4() -> None:
    args = bq.parse_args(["--suite", "visible"])
    assert args.cases == list(bq.SUITE_CASES) and args.methods == list(bq.SUITE_METHODS)
    assert args.seeds == [0, 1, 2, 3, 4]
    assert "phantom-lung" in bq.SUITE_CASES and "iguana" in bq.SUITE_CASES
    with pytest.raises(SystemExit):
        bq.parse_args(["--suite", "visible", "--cases", "brats"])
    settings = bq.suite_methods(["jule3d", "jule3d-paper", "otsu"])
    assert settings["jule3d (default)"].options() == {"preset": "fast"}, "the default passes nothing to segment"
    assert settings["jule3d (paper)"].options() == {"preset": "paper"} and settings["otsu"] == "otsu"


@pytest.fixture(scope="module")
def visible_phantoms() -> dict[str, np.ndarray]:
    return {variant: bq.phantom_case(variant).volume.data for variant in ("texture", "intensity", "lung")}


@pytest.mark.parametrize("name", bq.CHECK_CASES)
def test_check_cases_run_when_asked_and_are_not_the_visible_phantoms(name, visible_phantoms) -> None:
    """``--cases <check case>`` is accepted, the suite does not run it unless asked, and its volume is none of
    the visible phantoms'."""
    assert name not in bq.SUITE_CASES
    args = bq.parse_args(["--suite", "visible", "--cases", name])
    assert args.cases == [name]
    (load,) = bq.suite_loaders(args.cases, "zero-background")
    case = load()
    assert case.name == name and case.volume.shape == (96, 96, 96) and case.n_clusters == 3
    for variant, data in visible_phantoms.items():
        assert not np.array_equal(case.volume.data, data), variant


def test_other_texture_and_lung_cases_keep_the_layout_and_change_what_fills_it() -> None:
    """The other textures and the other foams fill the regions of the same generator seed."""
    textures = bq.check_case(bq.OTHER_TEXTURE_CASE)
    default = bq.phantom_case("texture", seed=bq.OTHER_TEXTURE_SEED)
    np.testing.assert_array_equal(textures.ground_truth, default.ground_truth)
    lung = bq.check_case(bq.OTHER_LUNG_CASE)
    clean = make_phantom(variant="lung", seed=bq.OTHER_LUNG_SEED, foams=bq.OTHER_LUNG_FOAMS, noise=0, bias=0,
                         blur=0)
    visible = make_phantom(variant="lung", seed=bq.OTHER_LUNG_SEED, noise=0, bias=0, blur=0)
    np.testing.assert_array_equal(lung.ground_truth, visible.labels)
    # Thinner walls around larger alveoli in normal tissue, thinner walls in smaller cells in invasive carcinoma.
    air = {name: [float((p.volume.data[0][p.labels == c] == 0).mean()) for c in (1, 2, 3)]
           for name, p in (("other", clean), ("visible", visible))}
    assert air["other"][0] > air["visible"][0] and air["other"][2] > air["visible"][2], air
    with pytest.raises(ValueError, match="name"):
        bq.check_case("phantom-texture")


def test_suite_runs_seedless_methods_once_and_scores_structure(monkeypatch) -> None:
    case = bq.phantom_case("lung", size=32)
    monkeypatch.setattr(bq, "suite_loaders", lambda cases, intensity: [lambda: case])
    rows = bq.run_suite(["phantom-lung"], ["otsu", "localmean"], [0, 1], "zero-background")
    assert [(r["method"], r["seed"]) for r in rows] == [("otsu", 0), ("localmean", 0), ("localmean", 1)]
    table = bq.suite_table(rows)
    assert "phantom-lung" in table and "worst seed NMI" in table


def test_suite_runs_jule3d_with_its_defaults_once_per_seed(monkeypatch) -> None:
    case = bq.phantom_case("intensity", size=32)
    calls = []

    def fake_segment(volume, n_clusters, seed, progress, **options):
        calls.append((seed, options))
        return bq.compare_methods(volume, n_clusters, ["kmeans"], seed=seed)[0].labels

    monkeypatch.setattr(bq, "suite_loaders", lambda cases, intensity: [lambda: case])
    monkeypatch.setattr(bq, "segment", fake_segment)
    rows = bq.run_suite(["phantom-intensity"], ["jule3d"], [0, 1], "zero-background")
    assert [(r["method"], r["seed"]) for r in rows] == [("jule3d (default)", 0), ("jule3d (default)", 1)]
    assert calls == [(0, {"preset": "fast"}), (1, {"preset": "fast"})], "defaults only: nothing but the preset"


def test_structure_shares_detects_a_merged_tissue() -> None:
    tissues = np.array([1, 1, 2, 2, 3, 3])
    assert bq.structure_shares(tissues, np.array([1, 1, 2, 2, 3, 3])) == {
        "cavity_share": 1.0, "soft_share": 1.0, "bone_share": 1.0, "distinct": 3.0}
    merged = bq.structure_shares(tissues, np.array([1, 1, 2, 2, 2, 3]))  # bone mostly with soft tissue
    assert merged["bone_share"] == 0.5 and merged["distinct"] == 2.0  # a tie goes to the lower class id
    merged = bq.structure_shares(tissues, np.array([1, 1, 2, 2, 2, 2]))
    assert merged["bone_share"] == 1.0 and merged["distinct"] == 2.0


def test_real_iguana_case(shared_data: Path, monkeypatch) -> None:
    monkeypatch.setenv("JULE3D_SHARED_DATA", str(shared_data))
    case = bq.iguana_case()
    assert case.volume.shape == (179, 256, 210) and set(np.unique(case.ground_truth)) == {0, 1, 2, 3}
    shares = bq.structure_shares(case.ground_truth, case.ground_truth)
    assert shares["distinct"] == 3.0 and shares["bone_share"] == 1.0
    depth = ndimage.distance_transform_edt(case.evaluation_mask)
    cavities = case.ground_truth == 1
    assert cavities.any() and depth[cavities].min() > bq.SURFACE_RIM  # the surface's dark rim is left out
    assert not case.ground_truth[~case.evaluation_mask].any()


def test_real_brats_case(shared_data: Path) -> None:
    folder = shared_data / "brats2015" / bq.BRATS_CASES[1]
    if not folder.is_dir():
        pytest.skip(f"{folder} is absent")
    case = bq.load_brats_case(folder)
    assert case.volume.n_channels == 2 and case.volume.shape == (105, 104, 95)
    assert not np.asarray(case.volume.data)[:, ~case.evaluation_mask].any()  # background set to 0
    counts = np.bincount(case.ground_truth[case.evaluation_mask], minlength=4)
    assert counts[0] == 0 and counts[2] == 45189 and counts[3] == 75471


@pytest.fixture
def bf(monkeypatch):
    """The ``bench_features`` script as a module (its folder on the path, for its own imports)."""
    monkeypatch.syspath_prepend(str(_PATH.parent))
    spec = importlib.util.spec_from_file_location("bench_features", _PATH.parent / "bench_features.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _two_halves(side: int, noise: float, step: float) -> tuple:
    """Two cases of one noise field whose classes are the two halves along x: ``bright`` adds ``step`` per class to
    ``noise`` times the field, ``alike`` is the field alone (the classes differ in nothing)."""
    truth = np.ones((side,) * 3, dtype=np.uint8)
    truth[:, :, side // 2:] = 2
    field = np.random.default_rng(0).normal(size=truth.shape).astype(np.float32)
    mask = np.ones(truth.shape, dtype=bool)
    bright = bq.Case("bright", Volume.from_array(field * noise + step * truth, mask=mask), truth, mask, 2)
    alike = bq.Case("alike", Volume.from_array(field, mask=mask), truth, mask, 2)
    return bright, alike


def test_feature_probe_separates_informative_from_random_features(bf) -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(1, 4, size=900)
    informative = np.eye(3)[y - 1] + rng.normal(0, 0.3, size=(900, 3))
    assert bf.probe_accuracy(informative, y, seed=0) > 0.9
    assert abs(bf.probe_accuracy(rng.normal(size=(900, 3)), y, seed=0) - 1 / 3) < 0.1


def test_supervised_ceiling_reads_what_local_statistics_hold(bf) -> None:
    """Classes that differ in brightness are read almost perfectly from local statistics; classes that differ in
    nothing (two halves of one noise field, split along an axis the halves do not see) are not."""
    bright, alike = _two_halves(24, 0.2, 1.0)
    stats = bf.local_statistics(bright, (3, 5))
    assert stats.shape == (bright.ground_truth.size, 5)
    corner = bright.volume.data[0][:2, :2, :2]  # the 3³ box of voxel (0, 0, 0) inside the volume
    np.testing.assert_allclose(stats[0, :3], [bright.volume.data[0][0, 0, 0], corner.mean(), corner.std()],
                               rtol=1e-4, atol=1e-5)
    read = bf.supervised_ceiling(bright, windows=(3, 5), smoothing=(1.0, 2.0))
    assert read["nmi"] > 0.8 and set(read) == {"nmi", "accuracy", "nmi_smoothed_1", "nmi_smoothed_2"}
    assert read["nmi_smoothed_2"] >= read["nmi"]  # a neighbour's evidence only firms up two flat slabs
    alike_read = bf.supervised_ceiling(alike, windows=(3, 5), smoothing=(8.0,))
    assert alike_read["nmi"] < 0.1 and alike_read["nmi_smoothed_8"] < 0.1  # smoothing makes no class of noise


def test_learnable_trains_on_the_true_classes_and_reports_loss_and_probe(bf) -> None:
    """Classes that differ in brightness are learnt when the network is told them: the loss falls below the
    margin and the training patches' probe reads them; classes that differ in nothing stay at chance."""
    bright, alike = _two_halves(40, 0.3, 2.0)
    (row,) = bf.learnable(bright, seed=0, gamma=1.0, n_patches=200, epochs=bf.LEARNABLE_EVERY)
    assert set(row) == {"epoch", "loss", "probe"} and row["epoch"] == bf.LEARNABLE_EVERY
    assert row["loss"] < 0.1 and row["probe"] > 0.9
    (row,) = bf.learnable(alike, seed=0, gamma=1.0, n_patches=200, epochs=bf.LEARNABLE_EVERY)
    assert row["probe"] < 0.7
