"""`jule3d batch`: jobs from volumes × grid, a local Dask cluster, failures recorded, resumable."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from jule3d.app.batch import expand_jobs, run_batch
from jule3d.app.cli import main
from jule3d.phantom import write_phantom

TINY = {
    "n_patches": 150,
    "epochs_per_period": 1,
    "final_epochs": 1,
    "k_s": 5,
    "max_points": 150,
    "baselines": ["kmeans"],
    "render_3d": False,
}


def test_jobs_are_volumes_times_grid(tmp_path: Path) -> None:
    for name in ("a.nii.gz", "b.nrrd", "notes.txt"):
        (tmp_path / name).write_text("x", encoding="utf-8")
    jobs = expand_jobs([tmp_path], {"k_s": [5, 10], "eta": [0.5]})
    assert [j.name for j in jobs] == ["a__eta-0.5__k_s-5", "a__eta-0.5__k_s-10",
                                      "b__eta-0.5__k_s-5", "b__eta-0.5__k_s-10"]
    assert jobs[1].parameters == {"eta": 0.5, "k_s": 10}
    assert jobs[0].volume_paths == [str((tmp_path / "a.nii.gz").resolve())]
    assert [j.name for j in expand_jobs([], None)] == ["phantom"]


@pytest.mark.parametrize("grid, match", [({"k_s": []}, "non-empty list"), ({"k_s": 5}, "non-empty list")])
def test_bad_grid(grid: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        expand_jobs([], grid)


def test_missing_input_and_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        expand_jobs([tmp_path / "nowhere.nii.gz"])
    with pytest.raises(ValueError, match="holds no volume"):
        expand_jobs([tmp_path])


def test_unknown_grid_parameter_fails_before_any_job(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="did you mean 'k_s'"):
        run_batch(tmp_path / "batch", grid={"ks": [5]})
    assert not (tmp_path / "batch").exists()


def test_unreachable_scheduler_is_a_clear_error_not_a_hang(tmp_path: Path) -> None:
    start = time.perf_counter()
    with pytest.raises(ValueError, match="cannot reach the Dask scheduler"):
        run_batch(tmp_path / "batch", parameters=TINY, scheduler="tcp://127.0.0.1:9")
    assert time.perf_counter() - start < 60


@pytest.mark.slow
def test_batch_runs_good_job_records_broken_one_and_resumes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    write_phantom(inputs / "good.nii.gz", shape=(40, 40, 40), seed=1)
    (inputs / "broken.nii.gz").write_bytes(b"this is not a NIfTI file")
    out = tmp_path / "batch"

    argv = ["batch", str(inputs), "--out", str(out)] + [x for k, v in TINY.items() for x in ("-p", k, json.dumps(v))]
    assert main(argv) == 1, "a batch with a failed job exits non-zero"
    index = json.loads((out / "index.json").read_text(encoding="utf-8"))
    status = {job["name"]: job for job in index}
    assert status["good"]["status"] == "ok"
    assert status["broken"]["status"] == "failed"
    assert "broken.nii.gz" in status["broken"]["error"]
    assert (out / "good" / "report.html").is_file() and (out / "good" / "labels.nii.gz").is_file()
    assert (out / "broken" / "notebooks" / "01_patch_sampling.ipynb").is_file(), "failed notebook kept"
    page = (out / "index.html").read_text(encoding="utf-8")
    assert "good/report.html" in page and "failed" in page

    again = run_batch(out, [inputs], parameters=TINY)
    assert {r.name: r.status for r in again}["good"] == "skipped"
    assert {r.name: r.status for r in again}["broken"] == "failed"
    assert "ok" not in {r.status for r in again}
