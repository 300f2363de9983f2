"""The run folder: inputs recorded by notebook 01 and reloaded by the later notebooks."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from jule3d.io import read_image, save_labels, save_volume
from jule3d.phantom import make_phantom
from jule3d.app.rundir import Inputs, RunDir
from jule3d.volume import Volume


def _same_inputs(a: Inputs, b: Inputs) -> None:
    np.testing.assert_array_equal(np.asarray(a.volume.data), np.asarray(b.volume.data))
    np.testing.assert_array_equal(a.volume.mask, b.volume.mask)
    assert a.volume.geometry == b.volume.geometry
    if a.ground_truth is None:
        assert b.ground_truth is None
    else:
        np.testing.assert_array_equal(a.ground_truth, b.ground_truth)
    assert (a.volume_paths, a.mask_path, a.ground_truth_path, a.is_phantom) == \
        (b.volume_paths, b.mask_path, b.ground_truth_path, b.is_phantom)


def test_prepare_phantom_and_reload(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    inputs = run.prepare_inputs(phantom_shape=24, n_classes=2, seed=3)
    assert (tmp_path / "run" / RunDir.PHANTOM).is_file() and (tmp_path / "run" / RunDir.PHANTOM_LABELS).is_file()
    record = json.loads((tmp_path / "run" / RunDir.INPUTS).read_text(encoding="utf-8"))
    assert record["is_phantom"] is True
    assert record["volume_paths"] == [str((tmp_path / "run" / RunDir.PHANTOM).resolve())]
    assert record["ground_truth_path"] == str((tmp_path / "run" / RunDir.PHANTOM_LABELS).resolve())
    assert not list((tmp_path / "run").glob("*.tmp"))
    assert inputs.is_phantom and inputs.volume.shape == (24, 24, 24)
    phantom = make_phantom(shape=(24, 24, 24), n_classes=2, seed=3)
    np.testing.assert_array_equal(inputs.ground_truth, phantom.labels)
    assert inputs.ground_truth.dtype == np.int32
    assert inputs.volume.geometry.matches(phantom.volume.geometry)
    # the evaluation voxels of a phantom are its labelled voxels
    np.testing.assert_array_equal(inputs.evaluation_mask, phantom.labels > 0)
    _same_inputs(inputs, RunDir(tmp_path / "run").load_inputs())


def test_phantom_files_reused_only_for_the_same_parameters(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    first = run.prepare_inputs(phantom_shape=20, seed=0)
    stamp = (tmp_path / RunDir.PHANTOM).stat().st_mtime_ns
    again = run.prepare_inputs(phantom_shape=20, seed=0)
    assert (tmp_path / RunDir.PHANTOM).stat().st_mtime_ns == stamp  # not rewritten
    _same_inputs(first, again)
    other = run.prepare_inputs(phantom_shape=24, seed=0)
    assert other.volume.shape == (24, 24, 24) and other.ground_truth.shape == (24, 24, 24)
    reseeded = run.prepare_inputs(phantom_shape=24, seed=1)
    assert not np.array_equal(reseeded.ground_truth, other.ground_truth) or \
        not np.array_equal(np.asarray(reseeded.volume.data), np.asarray(other.volume.data))
    _same_inputs(reseeded, run.load_inputs())


def test_prepare_volume_file_with_ground_truth_and_mask(tmp_path: Path, specimen_volume: Volume,
                                                        specimen_truth: np.ndarray) -> None:
    image = save_volume(specimen_volume, tmp_path / "ct.nrrd")
    truth = save_labels(specimen_truth.astype(np.uint8) * 2, tmp_path / "truth.nii.gz", reference=specimen_volume)
    mask = np.zeros(specimen_truth.shape, bool)
    mask[2:-2, 2:-2, 2:-2] = True
    mask_file = save_labels(mask.astype(np.uint8), tmp_path / "mask.nii.gz", reference=specimen_volume)
    run = RunDir(tmp_path / "run")
    inputs = run.prepare_inputs(str(image), mask_path=str(mask_file), ground_truth_path=str(truth))
    assert not inputs.is_phantom
    assert not (tmp_path / "run" / RunDir.PHANTOM).exists()
    assert inputs.volume_paths == [str(image.resolve())]
    assert inputs.mask_path == str(mask_file.resolve())
    np.testing.assert_array_equal(inputs.volume.mask, mask)
    np.testing.assert_array_equal(inputs.ground_truth, specimen_truth * 2)
    # a real volume is evaluated on its foreground
    np.testing.assert_array_equal(inputs.evaluation_mask, mask)
    _, geometry = read_image(image)
    assert inputs.volume.geometry.matches(geometry)
    _same_inputs(inputs, run.load_inputs())
    # several files are channels; no ground truth: no evaluation mask
    two = run.prepare_inputs([str(image), str(image)])
    assert two.volume.n_channels == 2 and two.ground_truth is None and two.evaluation_mask is None
    _same_inputs(two, run.load_inputs())


def test_ground_truth_of_another_geometry(tmp_path: Path, specimen_volume: Volume,
                                          specimen_truth: np.ndarray) -> None:
    image = save_volume(specimen_volume, tmp_path / "ct.nii.gz")
    shifted = replace(specimen_volume.geometry, origin=(0.0, 0.0, 0.0))
    truth = save_labels(specimen_truth.astype(np.uint8), tmp_path / "truth.nii.gz", reference=shifted)
    run = RunDir(tmp_path / "run")
    with pytest.raises(ValueError, match="ground_truth_path .*truth.nii.gz.* origin"):
        run.prepare_inputs(str(image), ground_truth_path=str(truth))
    assert not (tmp_path / "run" / RunDir.INPUTS).exists()  # nothing recorded


def test_ground_truth_without_volume(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="ground_truth_path"):
        RunDir(tmp_path / "run").prepare_inputs("", ground_truth_path="truth.nii.gz")
    assert not (tmp_path / "run").exists()


def test_missing_volume_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.nii.gz"):
        RunDir(tmp_path / "run").prepare_inputs(str(tmp_path / "missing.nii.gz"))


def test_require_and_file(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    assert repr(run) == f"RunDir({str(tmp_path / 'run')!r})"
    with pytest.raises(FileNotFoundError, match=r"model\.pt not found: run notebook 02_training with run_dir="):
        run.require(RunDir.MODEL, "notebook 02_training")
    with pytest.raises(FileNotFoundError, match="notebook 01_patch_sampling"):
        run.load_inputs()
    target = run.file(RunDir.MODEL)
    assert target == tmp_path / "run" / RunDir.MODEL and (tmp_path / "run").is_dir()
    target.write_bytes(b"x")
    assert run.require(RunDir.MODEL, "notebook 02_training") == target


def test_relative_run_dir_is_the_same_from_the_notebooks_folder(tmp_path: Path, monkeypatch) -> None:
    """`jule3d run --out runs/demo` in a project and notebook 04 opened from its notebooks/ share one folder."""
    from jule3d.app.pipeline import pipeline_notebooks
    from jule3d.app.rundir import resolve_run_dir

    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    for nb in pipeline_notebooks():
        (notebooks / nb.name).write_bytes(nb.read_bytes())
    monkeypatch.chdir(tmp_path)
    from_project = resolve_run_dir("runs/demo")
    monkeypatch.chdir(notebooks)  # JupyterLab runs a kernel in the notebook's own folder
    assert resolve_run_dir("runs/demo") == from_project == tmp_path / "runs" / "demo"
    assert RunDir("runs/demo").path == from_project
    (tmp_path / "other").mkdir()
    monkeypatch.chdir(tmp_path / "other")  # any other folder: relative to it
    assert resolve_run_dir("runs/demo") == tmp_path / "other" / "runs" / "demo"
    assert resolve_run_dir(tmp_path / "abs") == tmp_path / "abs"


def test_run_folder_of_another_version_is_refused(tmp_path: Path) -> None:
    from jule3d import __version__
    from jule3d.app.rundir import RunFolderVersionError

    run = RunDir(tmp_path / "run")
    run.prepare_inputs(phantom_shape=24, n_classes=2)
    assert json.loads((run.path / RunDir.MANIFEST).read_text(encoding="utf-8")) == {"jule3d_version": __version__}
    run.load_inputs()
    (run.path / RunDir.MANIFEST).unlink()  # as jule3d 0.1 left it
    with pytest.raises(RunFolderVersionError, match="older than 0.2.*--overwrite"):
        run.load_inputs()
    (run.path / RunDir.MANIFEST).write_text('{"jule3d_version": "9.9.0"}', encoding="utf-8")
    with pytest.raises(RunFolderVersionError, match="written by jule3d 9.9.0"):
        run.load_inputs()


def test_metrics_round_trip(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    assert run.load_metrics() is None
    phantom = make_phantom(shape=(24, 24, 24), seed=0)
    scores = {"nmi": 0.5, "nmi_geometric": 0.5, "ari": 0.4, "dice_mean": 0.6}
    result = type("MethodResult", (), {"method": "jule3d", "metrics": {"dice_per_class": {1: 0.6}},
                                       "row": lambda self: {"method": "jule3d", **scores}})()
    run.save_metrics(phantom.labels, phantom.volume, 1.5, 10.0, {"n_clusters": 3}, [result])
    record = run.load_metrics()
    assert record["methods"]["jule3d"]["nmi"] == 0.5 and record["n_clusters"] == 3 and record["seconds"] == 1.5
    assert RunDir.jule3d_scores(record) == scores and RunDir.jule3d_scores(None) == {}
    assert set(record["class_volumes_mm3"]) == {"1", "2", "3"}
    assert not list(run.path.glob("*.tmp"))


def test_training_of_several_networks_round_trips(tmp_path: Path) -> None:
    from jule3d.estimator import JuleSegmenter

    phantom = make_phantom(shape=(32, 32, 32), seed=0)
    results = JuleSegmenter(seed=1, n_networks=3, n_patches=40, epochs_per_period=1, final_epochs=1,
                            k_s=5).fit(phantom.volume).results_
    run = RunDir(tmp_path / "run")
    written = run.save_training(results)
    assert [p.name for p in written] == ["model.pt", "model_1.pt", "model_2.pt", "clusters.npz", "history.json"]
    models = run.load_models()
    assert len(models) == 3
    x = results[1].model.embed(np.zeros((1, 1, 17, 17, 17), np.float32))
    np.testing.assert_allclose(models[1].embed(np.zeros((1, 1, 17, 17, 17), np.float32)), x, rtol=1e-6)
    history = json.loads((run.path / RunDir.HISTORY).read_text(encoding="utf-8"))
    assert history["n_networks"] == 3 and {r["network"] for r in history["history"]} == {0, 1, 2}
    run.save_training(results[:1])  # a later run with one network leaves no stale model_1.pt behind
    assert len(run.load_models()) == 1 and not (run.path / "model_1.pt").exists()
