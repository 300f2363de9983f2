"""Side-by-side evaluation: measured cost, comparison rows, the markdown table and class volumes."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from jule3d.evaluation import MethodResult, Measured, class_volumes, compare_methods, measure, results_table
from jule3d.metrics import evaluate
from jule3d.volume import Volume


@pytest.fixture(scope="module")
def three_class() -> tuple[Volume, np.ndarray]:
    """(12, 14, 16) volume of three intensity classes inside a box mask, and its ground truth."""
    rng = np.random.default_rng(0)
    truth = np.zeros((12, 14, 16), np.uint8)
    truth[2:10, 2:12, 2:6], truth[2:10, 2:12, 6:10], truth[2:10, 2:12, 10:14] = 1, 2, 3
    image = np.where(truth > 0, truth * 10.0, 0.0) + rng.normal(0, 0.5, truth.shape)
    return Volume.from_array(image.astype(np.float32), spacing=(0.5, 1.0, 2.0), mask=truth > 0), truth


def test_measure_value_time_and_keywords() -> None:
    def add(a: int, b: int = 0) -> int:
        time.sleep(0.05)
        return a + b

    result = measure(add, 2, b=3)
    assert isinstance(result, Measured)
    assert result.value == 5
    assert result.seconds >= 0.05
    assert math.isfinite(result.peak_mb)


def test_measure_sees_peak_memory_of_a_temporary_allocation() -> None:
    def allocate() -> int:
        block = np.ones(200 * 2**20, dtype=np.uint8)  # 200 MB, every page written
        time.sleep(0.2)  # held while the sampler runs
        return int(block[::4096].sum())

    result = measure(allocate, interval=0.01)
    assert result.value == 200 * 2**20 // 4096
    assert result.peak_mb > 150
    assert measure(lambda: None).peak_mb < 100


def test_measure_propagates_errors() -> None:
    def fail() -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        measure(fail)


def test_compare_methods_rows(three_class) -> None:
    volume, truth = three_class
    perfect = truth.copy()
    calls = []

    def method() -> np.ndarray:
        calls.append(1)
        return perfect

    timed = Measured(truth, seconds=12.5, peak_mb=42.0)
    results = compare_methods(volume, 3, methods=("kmeans", "otsu"), ground_truth=truth,
                              extra={"callable": method, "measured": timed, "bare": perfect})
    by_name = {r.method: r for r in results}
    assert list(by_name) == ["callable", "measured", "bare", "kmeans", "otsu"]
    assert calls == [1]
    assert by_name["callable"].seconds >= 0 and math.isfinite(by_name["callable"].peak_mb)
    assert (by_name["measured"].seconds, by_name["measured"].peak_mb) == (12.5, 42.0)
    assert math.isnan(by_name["bare"].seconds) and math.isnan(by_name["bare"].peak_mb)
    for r in results:
        assert r.labels.shape == truth.shape
        assert set(r.metrics) >= {"nmi", "ari", "dice_mean", "n_voxels"}
        assert r.metrics["n_voxels"] == int((truth > 0).sum())
    # three well-separated intensity classes: the right labels, k-means and multi-Otsu are perfect
    for name in ("callable", "measured", "bare", "kmeans", "otsu"):
        assert by_name[name].metrics["nmi"] == pytest.approx(1.0)
    row = by_name["kmeans"].row()
    assert "dice_per_class" not in row and row["method"] == "kmeans" and "seconds" in row


def test_compare_methods_evaluation_mask_and_no_truth(three_class) -> None:
    volume, truth = three_class
    wrong = truth.copy()
    wrong[2:10, 2:12, 2:4] = 2  # half of class 1 mislabelled
    only_right = np.zeros(truth.shape, bool)
    only_right[:, :, 4:] = True
    only_right &= truth > 0
    [r] = compare_methods(volume, 3, methods=(), ground_truth=truth, evaluation_mask=only_right,
                          extra={"wrong": wrong})
    assert r.metrics == evaluate(truth, wrong, only_right)
    assert r.metrics["nmi"] == pytest.approx(1.0)
    [r] = compare_methods(volume, 3, methods=("kmeans",))
    assert r.metrics == {} and r.labels.shape == truth.shape


def test_compare_methods_bad_names(three_class) -> None:
    volume, truth = three_class
    calls = []
    with pytest.raises(ValueError, match="nope"):
        compare_methods(volume, 3, methods=("kmeans", "nope"), extra={"x": lambda: calls.append(1) or truth})
    assert calls == []  # rejected before anything runs
    with pytest.raises(ValueError, match="kmeans"):
        compare_methods(volume, 3, methods=("kmeans",), extra={"kmeans": truth})


def test_missing_optional_baselines_are_skipped_with_a_warning(three_class, monkeypatch) -> None:
    import jule3d.baselines as baselines

    volume, truth = three_class
    monkeypatch.setattr(baselines, "missing_package", lambda name: "antspyx" if name == "atropos" else None)
    with pytest.warns(UserWarning, match="'atropos' skipped: pip install antspyx"):
        results = compare_methods(volume, 3, methods=("kmeans", "atropos"), ground_truth=truth, skip_missing=True)
    assert [r.method for r in results] == ["kmeans"]


def test_results_frame_is_the_table_as_a_dataframe() -> None:
    from jule3d.evaluation import results_frame

    metrics = {"nmi": 0.91234, "ari": 0.8, "dice_mean": 0.7, "dice_per_class": {1: 0.7}}
    frame = results_frame([MethodResult("jule3d", np.zeros(1), 1.5, 20.0, metrics)])
    assert list(frame.columns) == ["NMI", "ARI", "matched Dice", "seconds", "peak MB"]
    assert frame.loc["jule3d", "NMI"] == 0.912


def test_results_table_markdown() -> None:
    metrics = {"nmi": 0.91234, "nmi_geometric": 0.9, "ari": 0.8, "dice_mean": 0.7, "dice_per_class": {1: 0.7},
               "n_voxels": 10}
    rows = [MethodResult("jule3d", np.zeros(1), 1.5, 20.0, metrics),
            MethodResult("bare", np.zeros(1), float("nan"), float("nan"), metrics)]
    table = results_table(rows, digits=2).splitlines()
    assert table[0] == "| method | NMI | NMI (geom.) | ARI | matched Dice | seconds | peak MB |"
    assert table[1] == "|---|---|---|---|---|---|---|"
    assert table[2] == "| jule3d | 0.91 | 0.90 | 0.80 | 0.70 | 1.50 | 20.00 |"
    assert table[3] == "| bare | 0.91 | 0.90 | 0.80 | 0.70 | nan | nan |"
    # without metrics only the cost columns appear
    bare = results_table([MethodResult("k", np.zeros(1), 2.0, 3.0)]).splitlines()
    assert bare[0] == "| method | seconds | peak MB |" and bare[2] == "| k | 2.000 | 3.000 |"


def test_class_volumes_anisotropic() -> None:
    labels = np.zeros((4, 5, 6), np.uint8)
    labels[0, :, :] = 1  # 30 voxels
    labels[1:3, 0, 0] = 3  # 2 voxels; label 2 absent
    vol = Volume.from_array(np.zeros((4, 5, 6), np.float32), spacing=(0.5, 2.0, 3.0))  # 3 mm³ per voxel
    out = class_volumes(labels, vol)
    assert out == {1: {"voxels": 30, "mm3": 90.0, "fraction": 30 / 32},
                   3: {"voxels": 2, "mm3": 6.0, "fraction": 2 / 32}}
    assert class_volumes(np.zeros((4, 5, 6), np.uint8), vol) == {}
