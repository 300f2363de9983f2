"""JuleSegmenter: the estimator protocol, Phase 1 / Phase 2 as fit / predict, one file, one parameter surface."""

from __future__ import annotations

import inspect
import json
import sys
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.base import clone

import jule3d
import jule3d.jule
from jule3d.estimator import JULE_FIELDS, JuleSegmenter, segment
from jule3d.io import prepare_volume
from jule3d.config import JuleConfig
from jule3d.parameters import PARAMETERS, TUNABLE, notebook_line
from jule3d.phantom import make_phantom
from jule3d.app.pipeline import notebook_parameters, pipeline_notebooks

TINY = dict(n_patches=80, epochs_per_period=1, final_epochs=1, k_s=5,
            jule_options={"net_overrides": {"n_filters": 8, "feature_dim": 16}})


@pytest.fixture(scope="module")
def volume():
    return prepare_volume(make_phantom(shape=(32, 32, 32), seed=0).volume)


@pytest.fixture(scope="module")
def fitted(volume) -> JuleSegmenter:
    return JuleSegmenter(n_networks=1, **TINY).fit(volume)


def test_signature_is_the_parameter_surface() -> None:
    signature = inspect.signature(JuleSegmenter)
    assert list(signature.parameters) == list(PARAMETERS)
    for name, p in PARAMETERS.items():
        assert signature.parameters[name].default == p.default, name
        assert p.stage in jule3d.parameters.STAGES and p.help


def test_every_jule_config_field_has_a_place() -> None:
    # a field of the training configuration is a parameter, set by the estimator itself, or a jule_options entry
    config_fields = {f.name for f in fields(JuleConfig)}
    assert set(JULE_FIELDS) <= config_fields
    others = config_fields - set(JULE_FIELDS) - {"n_clusters", "seed", "device"}
    assert "net_overrides" in others and "raw_features" in others
    JuleSegmenter(jule_options={name: getattr(JuleConfig(), name) for name in others}).jule_config()
    with pytest.raises(ValueError, match="parameters of JuleSegmenter"):
        JuleSegmenter(jule_options={"k_s": 3}).jule_config()


def test_notebook_parameter_cells_derive_from_the_surface() -> None:
    for notebook in pipeline_notebooks():
        cell = next(c for c in json.loads(notebook.read_text())["cells"] if "parameters" in c["metadata"].get("tags", []))
        lines = "".join(cell["source"]).splitlines()
        for name in notebook_parameters(notebook):
            if name in PARAMETERS:
                assert notebook_line(name) in lines, f"{notebook.name}: {name} differs from PARAMETERS"


def test_tunable_parameters_derive_from_the_surface() -> None:
    assert TUNABLE == {name: PARAMETERS[name].default for name in TUNABLE}
    assert {"n_clusters", "preset", "patch_size", "k_s", "intensity_weight"} <= set(TUNABLE)


def test_benchmark_settings_are_parameters() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        from bench_quality import JuleSettings
    finally:
        sys.path.pop(0)
    assert {f.name for f in fields(JuleSettings)} - {"overrides"} <= set(PARAMETERS)


def test_get_set_params_and_clone() -> None:
    segmenter = JuleSegmenter(n_clusters=4, k_s=7)
    assert segmenter.get_params()["k_s"] == 7 and segmenter.set_params(k_s=9).k_s == 9
    copy = clone(segmenter)
    assert copy is not segmenter and copy.get_params() == segmenter.get_params()
    assert "n_clusters=4" in repr(segmenter)


def test_resolved_fills_the_preset_values() -> None:
    fast, paper = JuleSegmenter().resolved(), JuleSegmenter(preset="paper").resolved()
    assert (fast["n_networks"], fast["phase2"]) == (2, "consensus")
    assert (paper["n_networks"], paper["phase2"], paper["patch_size"]) == (1, "kmeans", 27)
    assert paper["intensity_weight"] == paper["smoothing"] == 0.0
    assert JuleSegmenter(preset="paper", phase2="merge", smoothing=0.0).resolved()["smoothing"] == 0.0


@pytest.mark.parametrize("bad, match", [
    ({"n_clusters": 1}, "n_clusters"), ({"preset": "slow"}, "preset"), ({"phase2": "agdl"}, "phase2"),
    ({"n_networks": 0}, "n_networks"), ({"min_foreground": 1.5}, "min_foreground"),
    ({"smoothing": -1.0}, "smoothing"), ({"k_s": 0}, "k_s"), ({"stride": 3}, "stride=3"),
    ({"jule_options": {"gama": 1}}, "gama"),
])
def test_bad_parameters_fail_before_training(volume, bad, match, monkeypatch) -> None:
    def no_training(*args, **kwargs):
        raise AssertionError("bad parameters must be rejected before training")

    monkeypatch.setattr(jule3d.jule, "train_jule", no_training)
    with pytest.raises(ValueError, match=match):
        JuleSegmenter(**bad).fit(volume)


def test_fit_sets_the_fitted_attributes(fitted: JuleSegmenter) -> None:
    assert len(fitted.models_) == len(fitted.results_) == len(fitted.history_) == 1
    assert fitted.model_ is fitted.models_[0] and len(fitted.patches_) == 80
    assert fitted.history_[0] == fitted.results_[0].history
    grids = fitted.transform(fitted_volume := prepare_volume(make_phantom(shape=(32, 32, 32), seed=0).volume))
    assert len(grids) == 1 and grids[0].features.shape[0] == int(grids[0].selected.sum())
    labels = fitted.predict(fitted_volume)
    assert labels.shape == (32, 32, 32) and set(np.unique(labels)) == {0, 1, 2, 3}


def test_fit_predict_is_segment(volume) -> None:
    labels = JuleSegmenter(n_networks=1, seed=1, **TINY).fit_predict(volume)
    np.testing.assert_array_equal(labels, segment(volume, 3, seed=1, n_networks=1, progress=False, **TINY))


def test_predict_before_fit_is_refused(volume) -> None:
    with pytest.raises(RuntimeError, match="not fitted"):
        JuleSegmenter().predict(volume)


def test_save_load_round_trip(fitted: JuleSegmenter, volume, tmp_path: Path) -> None:
    path = fitted.save(tmp_path / "segmenter.pt")
    assert torch.load(path, weights_only=True)["format"] == "jule3d-segmenter-v1"
    loaded = JuleSegmenter.load(path)
    assert loaded.get_params() == fitted.get_params()
    np.testing.assert_array_equal(loaded.predict(volume), fitted.predict(volume))
    with pytest.raises(FileExistsError, match="overwrite"):
        fitted.save(path)
    path.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="corrupt"):
        JuleSegmenter.load(path)
    with pytest.raises(FileNotFoundError):
        JuleSegmenter.load(tmp_path / "missing.pt")


def test_prepare_volume_does_not_depend_on_the_input_type(tmp_path: Path) -> None:
    from jule3d.io import load_volume, save_volume

    phantom = make_phantom(shape=(24, 24, 24), seed=0)
    path = save_volume(phantom.volume, tmp_path / "ph.nii.gz")
    from_path, from_volume = prepare_volume(path), prepare_volume(load_volume(path, normalize=False))
    assert from_path.normalized and from_volume.normalized
    np.testing.assert_array_equal(from_path.mask, from_volume.mask)
    np.testing.assert_allclose(from_path.data, from_volume.data)
    assert prepare_volume(from_path) is from_path
    with pytest.raises(TypeError, match="volume must be"):
        prepare_volume(42)


def test_stage_functions_share_the_surface_defaults() -> None:
    # the stages can be called alone; where they take a setting of the surface, its default is the same, except
    # where None ("the preset's") cannot apply to a stage on its own
    from jule3d.patches import grid_patches, sample_patches
    from jule3d.segmentation import grid_features, label_grids, label_volume
    from jule3d.app.widgets import patch_sampling_explorer

    own = {sample_patches: {"patch_size"}, grid_patches: {"patch_size", "stride"}, label_volume: {"phase2"},
           label_grids: {"phase2"}, grid_features: {"batch_size", "device"}, segment: {"progress"},
           patch_sampling_explorer: {"patch_size", "n_patches", "stride"}}  # the explorer's display defaults
    checked = 0
    for function, exempt in own.items():
        for name, parameter in inspect.signature(function).parameters.items():
            if name in PARAMETERS and name not in exempt and parameter.default is not inspect.Parameter.empty:
                assert parameter.default == PARAMETERS[name].default, f"{function.__name__}({name}=...)"
                checked += 1
    assert checked >= 10
