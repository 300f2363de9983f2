"""Run the notebook pipeline with papermill and gather the results into one HTML report.

The pipeline is the ordered notebooks in ``notebooks/`` (01 patches -> 02 JULE training -> 03 t-SNE ->
04 segmentation). They share one run folder and one parameter vocabulary: a parameter given to the
pipeline reaches every notebook whose ``parameters`` cell declares it, and a name no notebook declares
is an error that suggests the closest known name.
"""

from __future__ import annotations

import difflib
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

__all__ = [
    "PipelineError",
    "NotebookRun",
    "PipelineResult",
    "notebook_dir",
    "pipeline_notebooks",
    "notebook_parameters",
    "check_parameters",
    "load_params_file",
    "run_pipeline",
]

#: Environment variable that points ``jule3d run`` at another notebooks folder.
NOTEBOOKS_ENV = "JULE3D_NOTEBOOKS"
#: Parameters the pipeline itself sets in every notebook that declares them.
PIPELINE_OWNED = ("run_dir", "volume_path")
#: File names of the pipeline notebooks: ``NN_name.ipynb``, run in the order of ``NN``.
NOTEBOOK_PATTERN = "[0-9][0-9]_*.ipynb"


class PipelineError(RuntimeError):
    """A notebook of the pipeline failed; the message names the notebook, the cell and the error."""


@dataclass
class NotebookRun:
    """Timing of one executed notebook."""

    name: str
    path: Path
    seconds: float
    compute_seconds: float
    skipped: bool = False

    @property
    def overhead_seconds(self) -> float:
        """Kernel start, parameter injection and saving: wall time not spent inside cells."""
        return max(self.seconds - self.compute_seconds, 0.0)


@dataclass
class PipelineResult:
    """What :func:`run_pipeline` produced."""

    run_dir: Path
    parameters: dict[str, Any]
    notebooks: list[NotebookRun] = field(default_factory=list)
    report: Path | None = None
    report_seconds: float = 0.0
    figures: list[Path] = field(default_factory=list)

    def timing_table(self) -> str:
        """A plain-text table of wall, compute and overhead seconds per notebook."""
        lines = [f"{'notebook':32s} {'wall s':>8s} {'cells s':>8s} {'overhead s':>10s}"]
        for nb in self.notebooks:
            tag = " (kept)" if nb.skipped else ""
            lines.append(f"{nb.name + tag:32s} {nb.seconds:8.1f} {nb.compute_seconds:8.1f} {nb.overhead_seconds:10.1f}")
        total = sum(nb.seconds for nb in self.notebooks)
        compute = sum(nb.compute_seconds for nb in self.notebooks)
        lines.append(f"{'total':32s} {total:8.1f} {compute:8.1f} {total - compute:10.1f}")
        lines.append(f"{'report':32s} {self.report_seconds:8.1f}")
        return "\n".join(lines)


def notebook_dir() -> Path:
    """The folder holding the pipeline notebooks.

    ``$JULE3D_NOTEBOOKS`` when set; otherwise the notebooks shipped in the package (``jule3d/notebooks`` of
    an installed wheel) or, in a source checkout, the repository's ``notebooks/``.
    """
    env = os.environ.get(NOTEBOOKS_ENV)
    if env:
        path = Path(env)
        if not path.is_dir():
            raise FileNotFoundError(f"{NOTEBOOKS_ENV}={env} is not a folder; point it at the jule3d notebooks")
        return path
    package = Path(__file__).resolve().parents[1]  # jule3d/
    for path in (package / "notebooks", package.parent / "notebooks"):
        if path.is_dir():
            return path
    raise FileNotFoundError(
        f"the jule3d notebooks are missing from {package} (a broken install?); reinstall jule3d or set "
        f"{NOTEBOOKS_ENV} to a folder of the pipeline notebooks"
    )


def pipeline_notebooks(folder: Path | None = None) -> list[Path]:
    """The pipeline's notebooks in order (``NN_name.ipynb``)."""
    folder = Path(folder) if folder is not None else notebook_dir()
    notebooks = sorted(p for p in folder.glob(NOTEBOOK_PATTERN))
    if not notebooks:
        raise FileNotFoundError(f"no pipeline notebooks (NN_name.ipynb) in {folder}")
    return notebooks


def notebook_parameters(notebook: Path) -> dict[str, dict[str, Any]]:
    """Parameters declared in a notebook's ``parameters`` cell: name -> {default, type, help}."""
    import papermill

    return {
        name: {"default": info["default"], "type": info["inferred_type_name"], "help": info["help"]}
        for name, info in papermill.inspect_notebook(str(notebook)).items()
    }


_TYPE_CHECKS: dict[str, tuple[type, ...]] = {
    "int": (int,),
    "float": (int, float),
    "str": (str,),
    "bool": (bool,),
    "list": (list, tuple),
    "dict": (dict,),
}


def check_parameters(
    parameters: Mapping[str, Any], notebooks: Sequence[Path]
) -> dict[Path, dict[str, Any]]:
    """Route parameters to the notebooks that declare them, checking names and types.

    Parameters
    ----------
    parameters : mapping
        Name -> value, as given to the pipeline.
    notebooks : sequence of Path
        The pipeline's notebooks.

    Returns
    -------
    dict
        Notebook -> the parameters it receives.

    Raises
    ------
    ValueError
        A name that no notebook declares (with the closest declared name), or a value whose type differs
        from the declared default's type (``None`` defaults accept anything).
    """
    declared = {nb: notebook_parameters(nb) for nb in notebooks}
    known: dict[str, tuple[str, str]] = {}
    for nb, params in declared.items():
        for name, info in params.items():
            known.setdefault(name, (nb.name, info["type"]))
    for name, value in parameters.items():
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            where = ", ".join(nb.name for nb in notebooks)
            raise ValueError(f"unknown parameter '{name}': none of the notebooks ({where}) declares it{hint}")
        nb_name, type_name = known[name]
        optional = re.fullmatch(r"Optional\[(\w+)\]", type_name)  # None keeps the default it stands for
        if optional:
            if value is None:
                continue
            type_name = optional.group(1)
        expected = _TYPE_CHECKS.get(type_name)
        if expected and value is not None and not (
            isinstance(value, expected) and not (isinstance(value, bool) and bool not in expected)
        ):
            raise ValueError(
                f"parameter '{name}' must be {type_name} (as declared in {nb_name}), "
                f"got {type(value).__name__} {value!r}"
            )
    return {nb: {k: v for k, v in parameters.items() if k in params} for nb, params in declared.items()}


def load_params_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML (or JSON) file of ``name: value`` parameters."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"params file {path} not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"params file {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"params file {path} must hold a mapping of name: value, got {type(data).__name__}")
    return data


def _cell_seconds(notebook: Path) -> float:
    import nbformat

    nb = nbformat.read(str(notebook), as_version=4)
    return float(sum((c.metadata.get("papermill", {}).get("duration") or 0.0) for c in nb.cells))


def _succeeded(notebook: Path) -> bool:
    import nbformat

    if not notebook.is_file():
        return False
    meta = nbformat.read(str(notebook), as_version=4).metadata.get("papermill", {})
    return not meta.get("exception") and meta.get("end_time") is not None


def _prepare_run_dir(run_dir: Path, parameters: Mapping[str, Any], overwrite: bool, resume: bool) -> None:
    from .rundir import RunDir

    params_file = run_dir / RunDir.PARAMS
    if run_dir.exists() and any(run_dir.iterdir()):
        if not params_file.is_file() and (resume or overwrite):
            raise FileExistsError(
                f"{run_dir} holds files but is not a jule3d run folder (no {RunDir.PARAMS}); refusing to "
                + ("resume" if resume else "delete") + " it: choose another --out folder"
            )
        if resume:
            RunDir(run_dir).check_version()
            previous = yaml.safe_load(params_file.read_text(encoding="utf-8")) or {}
            if previous != dict(parameters):
                changed = sorted(k for k in set(previous) | set(parameters) if previous.get(k) != parameters.get(k))
                raise ValueError(
                    f"cannot resume {run_dir}: parameters differ from the recorded run ({', '.join(changed)}); "
                    "use a new --out folder or --overwrite"
                )
        elif overwrite:
            shutil.rmtree(run_dir)
        else:
            raise FileExistsError(
                f"run folder {run_dir} already exists and is not empty; pass --overwrite to replace it "
                "or --resume to continue it"
            )
    try:
        (run_dir / RunDir.EXECUTED).mkdir(parents=True, exist_ok=True)
        params_file.write_text(yaml.safe_dump(dict(parameters), sort_keys=True), encoding="utf-8")
    except OSError as exc:
        raise PermissionError(f"cannot write the run folder {run_dir}: {exc.strerror or exc}") from None
    RunDir(run_dir).write_manifest()


def _kernel_manager_class(socket_dir: str) -> type:
    """A kernel manager that talks to its kernel over local IPC sockets in ``socket_dir``, not unencrypted TCP.

    ipykernel warns about plain TCP for every notebook. The caller owns ``socket_dir`` and removes it.
    """
    from jupyter_client.manager import AsyncKernelManager

    class IPCKernelManager(AsyncKernelManager):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.transport = "ipc"
            self.ip = os.path.join(socket_dir, "kernel")

    return IPCKernelManager


def run_pipeline(
    run_dir: str | os.PathLike,
    volume_paths: Sequence[str | os.PathLike] = (),
    parameters: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    resume: bool = False,
    cell_timeout: int = 1800,
    notebooks: Sequence[Path] | None = None,
    progress: bool | None = None,
    report: bool = True,
    figures: Sequence[str] = (),
) -> PipelineResult:
    """Execute the notebook pipeline into ``run_dir`` and write the HTML report.

    Parameters
    ----------
    run_dir : path
        Run folder (see :func:`jule3d.app.rundir.resolve_run_dir`); refused if it exists and is not empty, unless
        ``overwrite`` or ``resume``.
    volume_paths : sequence of path
        Input volume(s) (several = channels); empty = the bundled texture phantom.
    parameters : mapping, optional
        Notebook parameters (the shared vocabulary; ``jule3d run --help`` lists them).
    overwrite : bool
        Delete an existing run folder first (only one that jule3d made).
    resume : bool
        Keep notebooks that already ran successfully with the same parameters; run the rest, with
        ``resume=True`` for notebooks that declare it (training continues from its last checkpoint).
    cell_timeout : int
        Seconds a single cell may run before it is stopped.
    notebooks : sequence of Path, optional
        The notebooks to run (default: all pipeline notebooks in order).
    progress : bool or None
        papermill's per-cell progress bar; ``None`` shows it on a terminal and otherwise logs one line per
        notebook on stderr.
    report : bool
        Build ``report.html`` at the end.
    figures : sequence of str
        Also save every figure as a static image in these formats (``"png"``, ``"svg"``, ``"pdf"``) under
        ``run_dir/figures`` (see :func:`jule3d.app.report.export_figures`; needs Chrome or Chromium).

    Returns
    -------
    PipelineResult
        Paths, parameters and per-notebook timings.
    """
    import papermill
    from papermill.exceptions import PapermillExecutionError

    from .report import build_report, check_figure_formats, export_figures, headline_from
    from .rundir import RunDir, resolve_run_dir

    if overwrite and resume:
        raise ValueError("overwrite and resume exclude each other: choose one")
    if cell_timeout <= 0:
        raise ValueError(f"cell_timeout must be positive, got {cell_timeout}")
    check_figure_formats(figures)
    run_dir = resolve_run_dir(run_dir)
    notebooks = list(notebooks) if notebooks is not None else pipeline_notebooks()
    params = dict(parameters or {})
    for name in PIPELINE_OWNED:
        if name in params:
            raise ValueError(f"parameter '{name}' is set by the pipeline itself (use the command's arguments)")
    missing = [str(p) for p in volume_paths if not Path(p).exists()]
    if missing:
        raise FileNotFoundError(f"input volume not found: {', '.join(missing)}")
    params["volume_path"] = [str(Path(p).resolve()) for p in volume_paths]
    routed = check_parameters({k: v for k, v in params.items() if k != "volume_path"}, notebooks)
    _prepare_run_dir(run_dir, params, overwrite=overwrite, resume=resume)
    show_bar = sys.stderr.isatty() if progress is None else progress

    result = PipelineResult(run_dir=run_dir, parameters=params)
    with tempfile.TemporaryDirectory(prefix="jule3d-kernels-") as socket_dir:
        kernel_manager = _kernel_manager_class(socket_dir)
        for nb in notebooks:
            out = run_dir / RunDir.EXECUTED / nb.name
            if resume and _succeeded(out):
                result.notebooks.append(NotebookRun(nb.name, out, 0.0, 0.0, skipped=True))
                continue
            declared = notebook_parameters(nb)
            nb_params = dict(routed[nb])
            nb_params["run_dir"] = str(run_dir)
            if "volume_path" in declared:
                nb_params["volume_path"] = params["volume_path"]
            if resume and "resume" in declared:  # a notebook interrupted mid-way continues from its checkpoint
                nb_params["resume"] = True
            nb_params = {k: v for k, v in nb_params.items() if k in declared}
            start = time.perf_counter()
            try:
                papermill.execute_notebook(
                    str(nb), str(out), parameters=nb_params, kernel_name="python3", cwd=str(run_dir),
                    progress_bar=show_bar, execution_timeout=cell_timeout, kernel_manager_class=kernel_manager,
                )
            except PapermillExecutionError as exc:
                raise PipelineError(
                    f"notebook {nb.name} failed in cell {exc.exec_count}: {exc.ename}: {exc.evalue}\n"
                    f"the executed notebook is kept for inspection: {out}"
                ) from None
            seconds = time.perf_counter() - start
            result.notebooks.append(NotebookRun(nb.name, out, seconds, _cell_seconds(out)))
            if progress is None and not show_bar:
                print(f"jule3d run: {nb.name} done in {seconds:.1f} s", file=sys.stderr, flush=True)
    run = RunDir(run_dir)
    if report:
        start = time.perf_counter()
        headline = headline_from(run.load_metrics(), {n.name: n.seconds for n in result.notebooks})
        result.report = build_report([nb.path for nb in result.notebooks], run_dir / RunDir.REPORT, params,
                                     headline=headline)
        result.report_seconds = time.perf_counter() - start
    if figures:
        result.figures = export_figures([nb.path for nb in result.notebooks], run.file(run.FIGURES), figures)
    run.save_timings(
        [dict(name=n.name, seconds=n.seconds, compute_seconds=n.compute_seconds,
              overhead_seconds=n.overhead_seconds, skipped=n.skipped) for n in result.notebooks]
        + [dict(name="report", seconds=result.report_seconds)])
    return result
