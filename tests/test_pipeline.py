"""The notebook pipeline: notebooks as committed, parameter routing, `jule3d run` end to end, failures."""

from __future__ import annotations

import json
import re
from pathlib import Path

import nbformat
import pytest

from jule3d.app.cli import main
from jule3d.app.report import iter_figure_outputs, notebook_figures
from conftest import TINY
from jule3d.app.pipeline import (
    PipelineError,
    check_parameters,
    notebook_parameters,
    pipeline_notebooks,
    run_pipeline,
)

NOTEBOOKS = pipeline_notebooks()

def test_the_four_notebooks_in_order() -> None:
    assert [nb.name[:2] for nb in NOTEBOOKS] == ["01", "02", "03", "04"]


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_committed_clean_with_one_parameters_cell(notebook: Path) -> None:
    nb = nbformat.read(notebook, as_version=4)
    nbformat.validate(nb)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{notebook.name} must have exactly one cell tagged 'parameters'"
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{notebook.name} is committed with outputs"
            assert cell.execution_count is None, f"{notebook.name} is committed with execution counts"
    params = notebook_parameters(notebook)
    assert "run_dir" in params
    for name, info in params.items():
        assert info["type"] != "None", f"{notebook.name}: parameter {name} has no type annotation"
        assert info["help"], f"{notebook.name}: parameter {name} has no help comment"


def test_notebooks_contain_no_algorithm() -> None:
    """Notebooks call the package; loops over voxels/patches or model definitions belong in jule3d/."""
    for notebook in NOTEBOOKS:
        source = "\n".join(c.source for c in nbformat.read(notebook, as_version=4).cells if c.cell_type == "code")
        for forbidden in (r"torch\.nn", r"^\s*def ", r"^\s*class ", r"KMeans\(", r"for \w+ in range\("):
            assert not re.search(forbidden, source, re.M), f"{notebook.name} defines logic ({forbidden}); move it to jule3d"


def test_shared_parameter_vocabulary() -> None:
    """A name declared in several notebooks means the same thing: same type, default and meaning."""
    seen: dict[str, tuple[str, str, str, str]] = {}
    for notebook in NOTEBOOKS:
        for name, info in notebook_parameters(notebook).items():
            if name in seen:
                first, type_name, default, meaning = seen[name]
                assert (info["type"], info["default"], info["help"]) == (type_name, default, meaning), (
                    f"parameter {name}: {notebook.name} declares {info['type']} = {info['default']} "
                    f"({info['help']}), {first} declares {type_name} = {default} ({meaning})"
                )
            else:
                seen[name] = (notebook.name, info["type"], info["default"], info["help"])
    for name in ("run_dir", "seed", "n_clusters", "preset"):
        assert name in seen


def test_parameters_reach_every_notebook_that_declares_them() -> None:
    routed = check_parameters({"seed": 3, "n_clusters": 4, "k_s": 7}, NOTEBOOKS)
    for notebook, params in routed.items():
        declared = notebook_parameters(notebook)
        assert params == {k: v for k, v in {"seed": 3, "n_clusters": 4, "k_s": 7}.items() if k in declared}
    assert routed[NOTEBOOKS[1]]["k_s"] == 7


def test_unknown_parameter_suggests_the_closest_name() -> None:
    with pytest.raises(ValueError, match=r"unknown parameter 'n_patchs'.*did you mean 'n_patches'"):
        check_parameters({"n_patchs": 10}, NOTEBOOKS)


@pytest.mark.parametrize("name, value", [("n_patches", "many"), ("eta", "0.5"), ("resume", 1), ("seed", 1.5)])
def test_parameter_of_the_wrong_type(name: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"parameter '{name}' must be"):
        check_parameters({name: value}, NOTEBOOKS)


def test_optional_parameters_take_none_for_the_preset_value() -> None:
    routed = check_parameters({"eta": None, "k_s": 7}, NOTEBOOKS)
    assert routed[NOTEBOOKS[1]] == {"eta": None, "k_s": 7}
    with pytest.raises(ValueError, match="parameter 'k_s' must be int"):
        check_parameters({"k_s": "many"}, NOTEBOOKS)


def test_int_is_accepted_where_a_float_is_declared() -> None:
    check_parameters({"eta": 1, "min_foreground": 0}, NOTEBOOKS)


def test_existing_run_folder_is_refused(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "keep.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(FileExistsError, match="--overwrite"):
        run_pipeline(run_dir, parameters=TINY)
    assert (run_dir / "keep.txt").read_text(encoding="utf-8") == "mine"


def test_cli_reports_bad_parameters_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--out", str(tmp_path / "r"), "-p", "n_patchs", "10"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "did you mean 'n_patches'" in err
    assert not (tmp_path / "r").exists(), "a refused run must leave nothing behind"


def test_missing_volume_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere.nii.gz"):
        run_pipeline(tmp_path / "r", [tmp_path / "nowhere.nii.gz"])


def test_failing_notebook_stops_the_run_and_keeps_it(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with pytest.raises(PipelineError) as info:
        run_pipeline(run_dir, parameters={**TINY, "min_foreground": 1.5}, progress=False)
    message = str(info.value)
    assert "01_patch_sampling.ipynb failed" in message and "min_foreground" in message
    kept = run_dir / "notebooks" / "01_patch_sampling.ipynb"
    assert kept.is_file() and "min_foreground" in kept.read_text(encoding="utf-8")
    assert not (run_dir / "notebooks" / "02_jule_training.ipynb").exists()


@pytest.mark.slow
def test_run_end_to_end_writes_every_artefact(tiny_run) -> None:
    run_dir = tiny_run.run_dir
    for name in ("params.yaml", "run.json", "inputs.json", "patches.npz", "model.pt", "clusters.npz",
                 "history.json", "embedding.npz", "labels.nii.gz", "metrics.json", "report.html", "timings.json"):
        assert (run_dir / name).is_file(), f"{name} missing"
    for nb in NOTEBOOKS:
        assert (run_dir / "notebooks" / nb.name).is_file()
    metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    assert set(metrics["methods"]) == {"jule3d", "kmeans", "otsu"}
    assert 0.0 <= metrics["jule3d"]["nmi"] <= 1.0
    timing = {n.name: n for n in tiny_run.notebooks}
    assert all(n.seconds >= n.compute_seconds > 0 for n in timing.values())


@pytest.mark.slow
def test_report_holds_every_figure_of_every_notebook(tiny_run) -> None:
    """Static half of the check (the browser test draws them): one figure div per plotly output, by kind."""
    executed = [n.path for n in tiny_run.notebooks]
    report = tiny_run.report.read_text(encoding="utf-8")
    figures = [f for p in executed for f in iter_figure_outputs(nbformat.read(p, as_version=4))]
    assert len(figures) == notebook_figures(executed) >= 15
    assert report.count('class="figure"') == len(figures)
    kinds = [trace.get("type") for f in figures for trace in f["data"]]
    assert "mesh3d" in kinds, "notebook 04 must draw the 3D rendering"
    assert sum(f["layout"].get("title", {}).get("text", "").startswith("JULE-3D segmentation") for f in figures) == 1
    assert report.count("Plotly.newPlot") == len(figures)
    assert not re.search(r"<script[^>]*\bsrc=|<link\b|@import", report), "nothing may load from elsewhere"
    assert report.count("<script") == 1 + len(figures), "one plotly.js, one call per figure, nothing else"
    assert "prepare_inputs(" not in report, "code cells must be hidden in the report"
    assert "epoch/s]" not in report and "cell/s]" not in report, "progress bars stay out of the report"
    assert "| method |" not in report and "<th>NMI</th>" in report, "tables are HTML tables"
    assert 'id="summary"' in report and 'href="#04-' in report, "a table of contents links the sections"
    assert len(report) < 15e6, "plotly.js must be inlined once, not once per notebook"


@pytest.mark.slow
def test_resume_and_changed_parameters(tiny_run, tmp_path: Path) -> None:
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run.run_dir, run_dir)
    (run_dir / "notebooks" / NOTEBOOKS[-1].name).unlink()  # as if the run had stopped before notebook 04
    resumed = run_pipeline(run_dir, parameters=TINY, resume=True, progress=False, report=False)
    assert [n.skipped for n in resumed.notebooks] == [True, True, True, False]
    assert (run_dir / "notebooks" / NOTEBOOKS[-1].name).is_file()
    with pytest.raises(ValueError, match="parameters differ"):
        run_pipeline(run_dir, parameters={**TINY, "seed": 1}, resume=True)


def test_run_folder_parents_are_created(tmp_path: Path) -> None:
    """The README's `--out runs/demo` must work in a fresh clone, where runs/ does not exist yet."""
    with pytest.raises(PipelineError):  # fails in notebook 01, after the folders were made
        run_pipeline(tmp_path / "runs" / "demo", parameters={**TINY, "min_foreground": 1.5}, progress=False)
    assert (tmp_path / "runs" / "demo" / "params.yaml").is_file()


def test_run_help_lists_every_notebook_parameter(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["run", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for notebook in NOTEBOOKS:
        for name, declared in notebook_parameters(notebook).items():
            if name in ("run_dir", "volume_path"):
                assert f"\n  {name} (" not in out, f"{name} is set by the pipeline, not by -p"
                continue
            assert f"\n  {name} ({declared['type']}, default {declared['default']}" in out
            assert declared["help"] in out


def test_notebooks_command_copies_and_never_overwrites(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dest = tmp_path / "mine"
    assert main(["notebooks", str(dest)]) == 0
    assert sorted(p.name for p in dest.iterdir()) == [nb.name for nb in NOTEBOOKS]
    (dest / NOTEBOOKS[0].name).write_text("my edits", encoding="utf-8")
    assert main(["notebooks", str(dest)]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert (dest / NOTEBOOKS[0].name).read_text(encoding="utf-8") == "my edits"


def test_resume_of_a_run_folder_from_an_older_version(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "old"
    (run_dir / "notebooks").mkdir(parents=True)
    (run_dir / "params.yaml").write_text("volume_path: []\n", encoding="utf-8")  # jule3d 0.1 wrote no run.json
    assert main(["run", "--out", str(run_dir), "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "older than 0.2" in err and "--overwrite" in err


def test_overwrite_refuses_a_folder_jule3d_did_not_make(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "thesis.tex").write_text("precious", encoding="utf-8")
    assert main(["run", "--out", str(tmp_path), "--overwrite"]) == 2
    assert "not a jule3d run folder" in capsys.readouterr().err
    assert (tmp_path / "thesis.tex").read_text(encoding="utf-8") == "precious"


def test_unwritable_run_folder_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("", encoding="utf-8")
    assert main(["run", "--out", str(blocker / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot write the run folder" in err


def test_wheel_ships_the_notebooks(tmp_path: Path) -> None:
    """`pip install .` (not editable) must carry the notebooks, or `jule3d run` cannot start."""
    import subprocess
    import sys
    import zipfile

    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(root)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("jule3d-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"jule3d/notebooks/{nb.name}" for nb in NOTEBOOKS} <= names


@pytest.mark.slow
def test_notebook_opened_from_the_notebooks_folder_finds_the_run(tiny_run, tmp_path: Path) -> None:
    """After `jule3d run --out runs/demo` in a project, notebook 04 run in `notebooks/` (as JupyterLab runs it,
    with its own folder as the working folder) and `run_dir="runs/demo"` picks the run up."""
    import shutil

    import papermill

    project = tmp_path / "project"
    shutil.copytree(tiny_run.run_dir, project / "runs" / "demo")
    assert main(["notebooks", str(project / "notebooks")]) == 0
    notebook = project / "notebooks" / NOTEBOOKS[-1].name
    papermill.execute_notebook(str(notebook), str(tmp_path / "out.ipynb"), cwd=str(project / "notebooks"),
                               parameters={"run_dir": "runs/demo", "baselines": ["kmeans"], "render_3d": False},
                               progress_bar=False, kernel_name="python3")
    assert not (project / "notebooks" / "runs").exists()
    assert (project / "runs" / "demo" / "metrics.json").stat().st_mtime > tiny_run.report.stat().st_mtime
