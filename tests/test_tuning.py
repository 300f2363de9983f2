"""The interactive tuning panel: headless no-op, preview on a small volume, params file for `jule3d run -f`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from jule3d.phantom import make_phantom
from jule3d.app.pipeline import check_parameters, load_params_file, pipeline_notebooks
from jule3d.app.widgets import TUNABLE, preset_values, quick_preview, tuning_panel, write_params


@pytest.fixture(scope="module")
def volume():
    return make_phantom(shape=(40, 40, 40), seed=0).volume


def test_tunable_names_are_pipeline_parameters() -> None:
    """Every value the panel saves must be accepted by `jule3d run -f`."""
    check_parameters(TUNABLE, pipeline_notebooks())


def test_panel_is_a_no_op_without_a_frontend(volume, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JULE3D_INTERACTIVE", "0")
    assert tuning_panel(volume) is None


def test_panel_saves_only_its_own_file(volume, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JULE3D_INTERACTIVE", "1")
    target = tmp_path / "params.yaml"
    target.write_text("mine: 1\n", encoding="utf-8")
    panel = tuning_panel(volume, params_path=target)
    buttons = [c for row in panel.children if hasattr(row, "children") for c in row.children
               if type(c).__name__ == "Button"]
    save = next(b for b in buttons if b.description == "Save params")
    save.click()
    assert target.read_text(encoding="utf-8") == "mine: 1\n", "a file the panel did not write must not be replaced"
    target.unlink()
    save.click()
    assert load_params_file(target) == {**TUNABLE, **preset_values("fast")}
    preset = panel.children[0].children[0]
    preset.value = "paper"  # the sliders follow the preset
    save.click()  # now its own file: replaced without complaint
    assert load_params_file(target) == {**TUNABLE, **preset_values("paper"), "preset": "paper"}
    assert preset_values("paper")["patch_size"] == 27


def test_write_params_round_trip_and_refusals(tmp_path: Path) -> None:
    path = write_params({"k_s": np.int64(7), "eta": 0.5}, tmp_path / "p.yaml")
    assert load_params_file(path) == {"k_s": 7, "eta": 0.5}
    with pytest.raises(FileExistsError):
        write_params({"k_s": 8}, path)
    with pytest.raises(FileNotFoundError):
        write_params({"k_s": 8}, tmp_path / "missing" / "p.yaml")


@pytest.mark.slow
def test_quick_preview_labels_a_slab(volume, monkeypatch: pytest.MonkeyPatch) -> None:
    import jule3d.segmentation

    seen = {}
    real = jule3d.segmentation.label_grids

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(jule3d.segmentation, "label_grids", spy)
    part, labels = quick_preview(volume, {"n_clusters": 3, "k_s": 5, "n_patches": 120, "smoothing": 1.0},
                                 n_preview=120)
    assert labels.shape == part.shape and part.shape[1:] == volume.shape[1:]
    assert part.shape[0] == 17 + 8
    # Phase 2 settings reach label_grids; untouched ones take the preset's Phase 2 defaults
    assert seen["smoothing"] == 1.0 and seen["intensity_weight"] == 1.0 and seen["phase2"] == "consensus"
    assert set(np.unique(labels[part.mask])) <= {1, 2, 3}
    assert (labels[~part.mask] == 0).all()
    with pytest.raises(ValueError, match="unknown tuning parameter"):
        quick_preview(volume, {"kss": 3})
