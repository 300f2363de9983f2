"""Many pipeline runs at once on Dask: a folder of volumes × a parameter grid, one run folder per job.

Each job is one :func:`jule3d.app.pipeline.run_pipeline` call in its own run folder. Jobs run on a local Dask
cluster by default, or on an existing scheduler given by address, so a lab scales to many machines without
changing anything. A failed job is recorded and the others carry on; a finished job (its ``status.json``
says ``ok``) is skipped when the batch is run again, so a batch is resumable.
"""

from __future__ import annotations

import html
import itertools
import json
import os
import re
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from .rundir import RunDir

__all__ = ["Job", "JobResult", "expand_jobs", "run_batch", "safe_name", "write_index"]

INDEX_FILE = "index.html"
VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd", ".npy", ".tif", ".tiff", ".zarr")


@dataclass
class Job:
    """One pipeline run of a batch."""

    name: str
    volume_paths: list[str]
    parameters: dict[str, Any]


@dataclass
class JobResult:
    """Outcome of one job: ``ok``, ``failed`` or ``skipped`` (finished in an earlier batch run)."""

    name: str
    status: str
    run_dir: str
    seconds: float = 0.0
    error: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    parameters: dict[str, Any] = field(default_factory=dict)


def _is_volume(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith(VOLUME_SUFFIXES) or (path.is_dir() and not name.startswith("."))


def safe_name(text: str) -> str:
    """``text`` as a file name: runs of characters other than letters, digits, ``.``, ``_`` and ``-`` become ``_``.

    Examples
    --------
    >>> safe_name("K_s=10, eta=0.5 (fast)")
    'K_s_10_eta_0.5_fast'
    """
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "job"


def expand_jobs(
    volumes: Sequence[str | os.PathLike], grid: Mapping[str, Sequence[Any]] | None = None
) -> list[Job]:
    """The jobs of a batch: every volume (files, or the volumes inside folders) × every grid combination.

    Parameters
    ----------
    volumes : sequence of path
        Volume files, or folders whose volume files (and DICOM/TIFF sub-folders) are each one job.
        An empty sequence means one job on the bundled phantom.
    grid : mapping, optional
        Parameter name -> list of values; the batch runs their Cartesian product.
    """
    paths: list[Path] = []
    for item in volumes:
        item = Path(item)
        if not item.exists():
            raise FileNotFoundError(f"batch input {item} not found")
        if item.is_dir() and not any(p.suffix.lower() in (".dcm", ".tif", ".tiff") for p in item.iterdir()):
            found = sorted(p for p in item.iterdir() if _is_volume(p))
            if not found:
                raise ValueError(f"batch input folder {item} holds no volume files ({', '.join(VOLUME_SUFFIXES)})")
            paths.extend(found)
        else:
            paths.append(item)
    grid = dict(grid or {})
    for name, values in grid.items():
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
            raise ValueError(f"grid parameter '{name}' must be a non-empty list of values, got {values!r}")
    names = sorted(grid)
    combos = list(itertools.product(*(grid[n] for n in names))) or [()]
    jobs = []
    for path in paths or [None]:
        base = "phantom" if path is None else safe_name(path.name.split(".")[0])
        for combo in combos:
            params = dict(zip(names, combo))
            suffix = "".join(f"__{n}-{safe_name(str(v))}" for n, v in params.items())
            jobs.append(Job(base + suffix, [] if path is None else [str(path.resolve())], params))
    seen: set[str] = set()
    for job in jobs:
        if job.name in seen:
            raise ValueError(f"two batch inputs map to the same run folder name {job.name!r}; rename one")
        seen.add(job.name)
    return jobs


def _run_job(job: Job, run_dir: str, common: Mapping[str, Any], cell_timeout: int) -> dict[str, Any]:
    """Execute one job (runs on a Dask worker); never raises, returns a JobResult as a dict."""
    from .pipeline import run_pipeline

    start = time.perf_counter()
    params = {**common, **job.parameters}
    result = JobResult(job.name, "ok", run_dir, parameters=params)
    try:
        run_pipeline(run_dir, job.volume_paths, params, overwrite=True, cell_timeout=cell_timeout, progress=False)
        result.metrics = RunDir(run_dir).load_metrics() or {}
    except Exception as exc:  # noqa: BLE001 - a batch records every failure and carries on
        result.status = "failed"
        result.error = f"{type(exc).__name__}: {exc}"
        if not isinstance(exc, (ValueError, FileNotFoundError, RuntimeError)):
            result.error += "\n" + traceback.format_exc(limit=3)
    result.seconds = time.perf_counter() - start
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    (Path(run_dir) / RunDir.STATUS).write_text(json.dumps(asdict(result), indent=2, default=str), encoding="utf-8")
    return asdict(result)


def run_batch(
    out_dir: str | os.PathLike,
    volumes: Sequence[str | os.PathLike] = (),
    grid: Mapping[str, Sequence[Any]] | None = None,
    parameters: Mapping[str, Any] | None = None,
    scheduler: str | None = None,
    n_workers: int = 1,
    cell_timeout: int = 1800,
) -> list[JobResult]:
    """Run every job of a batch on Dask and write ``index.html`` / ``index.json`` into ``out_dir``.

    Parameters
    ----------
    out_dir : path
        Batch folder; each job runs in ``out_dir/<job name>``.
    volumes : sequence of path
        Volume files or folders of volumes (see :func:`expand_jobs`).
    grid : mapping, optional
        Parameter grid (name -> values).
    parameters : mapping, optional
        Parameters common to every job.
    scheduler : str, optional
        Address of an existing Dask scheduler (``tcp://host:8786``); a local cluster when omitted.
    n_workers : int
        Workers of the local cluster (each runs one job at a time).
    cell_timeout : int
        Per-cell execution timeout of each notebook, seconds.

    Returns
    -------
    list of JobResult
        One per job, in job order.
    """
    from ..chunked import connect, disconnect
    from .pipeline import check_parameters, pipeline_notebooks

    if n_workers < 1:
        raise ValueError(f"n_workers must be at least 1, got {n_workers}")
    jobs = expand_jobs(volumes, grid)
    common = dict(parameters or {})
    notebooks = pipeline_notebooks()
    for job in jobs:  # fail fast on bad names or types, before any worker starts
        check_parameters({**common, **job.parameters}, notebooks)
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)

    results: dict[str, JobResult] = {}
    pending = []
    for job in jobs:
        status = out / job.name / RunDir.STATUS
        if status.is_file():
            previous = JobResult(**json.loads(status.read_text(encoding="utf-8")))
            if previous.status == "ok" and previous.parameters == {**common, **job.parameters}:
                previous.status = "skipped"
                results[job.name] = previous
                continue
        pending.append(job)
    if pending:
        client = connect(scheduler or "local", n_workers)
        try:
            futures = [client.submit(_run_job, job, str(out / job.name), common, cell_timeout,
                                     key=f"jule3d-{job.name}-{time.time_ns()}", pure=False) for job in pending]
            for job, future in zip(pending, futures):
                try:
                    results[job.name] = JobResult(**future.result())
                except Exception as exc:  # noqa: BLE001 - a lost worker is a failed job, not a failed batch
                    results[job.name] = JobResult(job.name, "failed", str(out / job.name),
                                                  error=f"{type(exc).__name__}: {exc}")
        finally:
            disconnect(client)
    ordered = [results[job.name] for job in jobs]
    write_index(out, ordered)
    return ordered


_METRIC_COLUMNS = ("nmi", "ari", "dice_mean")


def write_index(out_dir: Path, results: Sequence[JobResult]) -> Path:
    """Write ``index.json`` and an ``index.html`` table (status, metrics, seconds, links) for a batch."""
    out_dir = Path(out_dir)
    (out_dir / "index.json").write_text(json.dumps([asdict(r) for r in results], indent=2, default=str), encoding="utf-8")
    rows = []
    for r in results:
        jule = RunDir.jule3d_scores(r.metrics)
        cells = [f"<td>{html.escape(r.name)}</td>", f"<td class='{r.status}'>{r.status}</td>"]
        cells += [f"<td>{jule[m]:.3f}</td>" if isinstance(jule.get(m), (int, float)) else "<td></td>"
                  for m in _METRIC_COLUMNS]
        cells.append(f"<td>{r.seconds:.1f}</td>")
        report = Path(r.run_dir) / RunDir.REPORT
        link = f"<a href='{html.escape(os.path.relpath(report, out_dir))}'>report</a>" if report.is_file() else ""
        cells.append(f"<td>{link}</td><td><pre>{html.escape(r.error)}</pre></td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    head = "".join(f"<th>{h}</th>" for h in ("job", "status", *_METRIC_COLUMNS, "seconds", "report", "error"))
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>jule3d batch</title><style>"
        "body{font-family:sans-serif}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px}"
        ".failed{color:#c00}.ok{color:#080}.skipped{color:#555}pre{margin:0;white-space:pre-wrap;max-width:50em}"
        f"</style></head><body><h1>jule3d batch: {len(results)} jobs</h1>"
        f"<table><tr>{head}</tr>{''.join(rows)}</table></body></html>"
    )
    index = out_dir / INDEX_FILE
    index.write_text(page, encoding="utf-8")
    return index
