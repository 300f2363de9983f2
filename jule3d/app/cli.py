"""The ``jule3d`` command line: one subcommand per task.

Each subcommand lives in a small ``_cmd_*`` function that parses nothing itself: argparse does the
parsing, the function calls the public API, and every expected failure (bad input) becomes a one-line
message on stderr with exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Sequence

__all__ = ["main", "build_parser", "parameter_help"]


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser with all subcommands."""
    parser = argparse.ArgumentParser(
        prog="jule3d",
        description="Unsupervised segmentation of 3D medical images with JULE-3D.",
    )
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"jule3d {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in _REGISTRY:
        register(sub)
    return parser


_REGISTRY: list[Callable[[argparse._SubParsersAction], None]] = []


def subcommand(register: Callable[[argparse._SubParsersAction], None]):
    """Decorator: add a function that registers one subcommand on the parser."""
    _REGISTRY.append(register)
    return register


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``jule3d`` command; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError, TypeError, RuntimeError) as exc:  # OSError: files, a full disk, Dask's scheduler
        print(f"jule3d {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"jule3d {args.command}: interrupted", file=sys.stderr)
        return 130


@subcommand
def _register_segment(sub: argparse._SubParsersAction) -> None:
    from ..chunked import CHUNK, FIT_POSITIONS, IN_MEMORY_VOXELS
    from ..parameters import add_cli_options

    p = sub.add_parser(
        "segment", help="segment a volume without labels (JULE-3D) into a label map",
        description="Train JULE-3D on patches of the input (or use --model), then label every voxel: "
                    "0 = background, 1..K = classes ordered by mean intensity. Several inputs = channels.",
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="volume file(s); several = co-registered channels")
    p.add_argument("--out", required=True, metavar="LABELS.nii.gz", help="label map to write (input geometry)")
    p.add_argument("--mask", metavar="MASK", help="foreground mask file (default: automatic)")
    p.add_argument("--model", metavar="MODEL.pt", help="trained model: skip training")
    add_cli_options(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    big = p.add_argument_group("large volumes", "the method chunk by chunk in bounded memory (jule3d.chunked)")
    big.add_argument("--resume", action="store_true",
                     help="continue the unfinished run kept in OUT.jule3d-work (after a crash or a kill)")
    big.add_argument("--scheduler", metavar="ADDRESS",
                     help="run Phase 2's chunks on Dask: 'local' (two worker processes) or tcp://host:port")
    big.add_argument("--chunk", type=int, default=CHUNK, metavar="N",
                     help=f"grid positions per side of a Phase 2 chunk (default {CHUNK}; memory grows with N³)")
    big.add_argument("--cache", metavar="DIR",
                     help="folder for the Zarr copy of a compressed input (default: in OUT.jule3d-work)")
    big.add_argument("--in-memory-voxels", type=int, default=IN_MEMORY_VOXELS, metavar="N",
                     help=f"read inputs of at most N voxels whole (default {IN_MEMORY_VOXELS})")
    big.add_argument("--fit-positions", type=int, default=FIT_POSITIONS, metavar="N",
                     help=f"grid positions Phase 2 is fitted on (default {FIT_POSITIONS})")
    p.set_defaults(func=_cmd_segment)


def _cmd_segment(args: argparse.Namespace) -> int:
    from ..chunked import check_output, segment_file
    from ..parameters import cli_values

    # segment_file's own check, first, so that the messages name the options
    check_output(Path(args.out), args.inputs + ([args.mask] if args.mask else []), args.overwrite, "--out",
                 "--overwrite")
    segment_file(args.inputs, args.out, mask=args.mask, model=args.model, resume=args.resume,
                       scheduler=args.scheduler, chunk=args.chunk, cache=args.cache, overwrite=args.overwrite,
                       in_memory_voxels=args.in_memory_voxels, fit_positions=args.fit_positions,
                       **cli_values(args))  # its last line on stderr: what it wrote, with the class volumes
    return 0


def _parse_value(text: str):
    """A parameter value from the command line, typed like YAML: 3 -> int, 0.5 -> float, [1, 2] -> list."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _collect_parameters(args: argparse.Namespace) -> dict:
    from .pipeline import load_params_file

    params: dict = {}
    for path in args.params_file or []:
        params.update(load_params_file(path))
    for name, value in args.param or []:
        params[name] = _parse_value(value)
    return params


def _add_parameter_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-p", "--param", nargs=2, action="append", metavar=("NAME", "VALUE"),
                   help="notebook parameter (repeatable); VALUE is read as YAML (3, 0.5, true, [1, 2])")
    p.add_argument("-f", "--params-file", action="append", metavar="PARAMS.yaml",
                   help="YAML file of name: value parameters (repeatable; -p wins)")
    p.add_argument("--cell-timeout", type=int, default=1800, metavar="S",
                   help="seconds one notebook cell may run (default 1800)")


class _RunHelp(argparse.Action):
    """``jule3d run -h``: the options, then every notebook parameter with its type, default and meaning."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, **kwargs) -> None:
        super().__init__(option_strings, dest=dest, default=argparse.SUPPRESS, nargs=0,
                         help="show this help, with the notebook parameters, and exit")

    def __call__(self, parser: argparse.ArgumentParser, namespace, values, option_string=None) -> None:
        parser.print_help()
        print("\n" + parameter_help())
        parser.exit()


def parameter_help() -> str:
    """The notebook parameters ``-p NAME VALUE`` accepts: name, type, default, meaning and notebooks."""
    from .pipeline import PIPELINE_OWNED, notebook_parameters, pipeline_notebooks

    seen: dict[str, tuple[dict, list[str]]] = {}
    for nb in pipeline_notebooks():
        for name, info in notebook_parameters(nb).items():
            if name not in PIPELINE_OWNED:
                seen.setdefault(name, (info, []))[1].append(nb.name[:2])
    lines = ["notebook parameters (-p NAME VALUE, or NAME: VALUE in a -f file):"]
    for name, (info, where) in seen.items():
        lines.append(f"  {name} ({info['type']}, default {info['default']}; notebooks {', '.join(where)})")
        lines.append(f"      {info['help']}")
    return "\n".join(lines)


@subcommand
def _register_resample(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("resample", help="resample a volume of any size to cubic voxels, slab by slab",
                       description="Linear interpolation to cubic voxels (jule3d.resample.resample_file): the same "
                                   "voxels as resample_isotropic, in memory bounded by a slab of slices.")
    p.add_argument("input", metavar="INPUT", help="volume file or folder")
    p.add_argument("--out", required=True, metavar="OUT.nii", help="output: .nii, .nii.gz, .npy or .zarr")
    p.add_argument("--spacing", type=float, metavar="MM", help="voxel size (default: the finest of the input's)")
    p.add_argument("--cache", metavar="DIR", help="folder to keep the Zarr copy of an input that cannot be read in "
                                                  "blocks, e.g. .nii.gz (default: a temporary one, removed)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.set_defaults(func=_cmd_resample)


def _cmd_resample(args: argparse.Namespace) -> int:
    from ..resample import resample_file

    out = resample_file(args.input, args.out, spacing=args.spacing, cache=args.cache, overwrite=args.overwrite)
    print(f"jule3d resample: wrote {out}", file=sys.stderr)
    return 0


@subcommand
def _register_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run", help="run the notebook pipeline and write an HTML report", add_help=False,
        description="Execute notebooks 01-04 with papermill into RUN_DIR: executed notebooks, report.html, "
                    "the label volume, metrics.json and params.yaml. With no VOLUME, the bundled texture phantom.",
    )
    p.add_argument("-h", "--help", action=_RunHelp)
    p.add_argument("volumes", nargs="*", metavar="VOLUME", help="input volume file(s); several = channels")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="run folder to create")
    _add_parameter_options(p)
    group = p.add_mutually_exclusive_group()
    group.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    group.add_argument("--resume", action="store_true", help="continue a run: keep notebooks that finished")
    p.add_argument("--png", action="append_const", const="png", dest="figures",
                   help="also save every figure as PNG into RUN_DIR/figures (needs Chrome or Chromium)")
    p.add_argument("--svg", action="append_const", const="svg", dest="figures",
                   help="also save every figure as SVG into RUN_DIR/figures (needs Chrome or Chromium)")
    p.set_defaults(func=_cmd_run)


def _cmd_run(args: argparse.Namespace) -> int:
    from .pipeline import PipelineError, run_pipeline

    try:
        result = run_pipeline(args.out, args.volumes, _collect_parameters(args), overwrite=args.overwrite,
                              resume=args.resume, cell_timeout=args.cell_timeout, figures=args.figures or ())
    except PipelineError as exc:
        print(f"jule3d run: {exc}", file=sys.stderr)
        return 1
    print(result.timing_table(), file=sys.stderr)
    if result.figures:
        print(f"figures: {len(result.figures)} files in {result.figures[0].parent}", file=sys.stderr)
    print(f"report: {result.report}")
    return 0


@subcommand
def _register_notebooks(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "notebooks", help="copy the pipeline notebooks into a folder, to open them in JupyterLab",
        description="Copy the four pipeline notebooks shipped with jule3d into DEST (default: ./notebooks). "
                    "A relative run_dir in them names the same folder as jule3d run --out from DEST's parent.",
    )
    p.add_argument("dest", nargs="?", default="notebooks", metavar="DEST", help="folder to create or fill")
    p.set_defaults(func=_cmd_notebooks)


def _cmd_notebooks(args: argparse.Namespace) -> int:
    import shutil

    from .pipeline import pipeline_notebooks

    dest = Path(args.dest)
    sources = pipeline_notebooks()
    clash = [dest / nb.name for nb in sources if (dest / nb.name).exists()]
    if clash:
        raise FileExistsError(f"{clash[0]} exists; refusing to overwrite your notebook (choose another DEST)")
    dest.mkdir(parents=True, exist_ok=True)
    for nb in sources:
        shutil.copyfile(nb, dest / nb.name)
    print(f"jule3d notebooks: copied {len(sources)} notebooks into {dest}; open them with: jupyter lab {dest}",
          file=sys.stderr)
    return 0


@subcommand
def _register_batch(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "batch", help="run the pipeline over many volumes and/or a parameter grid on Dask",
        description="One run folder per (volume, parameter combination) under OUT_DIR, an index.html table of "
                    "metrics and links; failed jobs are recorded and the rest carry on; finished jobs are skipped "
                    "when the batch is run again.",
    )
    p.add_argument("volumes", nargs="*", metavar="VOLUME_OR_FOLDER",
                   help="volume files or folders of volumes (none: the bundled phantom)")
    p.add_argument("--out", required=True, metavar="OUT_DIR", help="batch folder")
    p.add_argument("-g", "--grid", nargs=2, action="append", metavar=("NAME", "VALUES"),
                   help="grid parameter and its values as a YAML list, e.g. -g K_s '[10, 20]' (repeatable)")
    p.add_argument("--scheduler", metavar="ADDRESS", help="existing Dask scheduler (default: a local cluster)")
    p.add_argument("--workers", type=int, default=1, help="workers of the local cluster (default 1)")
    _add_parameter_options(p)
    p.set_defaults(func=_cmd_batch)


def _cmd_batch(args: argparse.Namespace) -> int:
    from .batch import run_batch

    grid = {}
    for name, values in args.grid or []:
        parsed = _parse_value(values)
        grid[name] = parsed if isinstance(parsed, list) else [parsed]
    results = run_batch(args.out, args.volumes, grid, _collect_parameters(args), scheduler=args.scheduler,
                        n_workers=args.workers, cell_timeout=args.cell_timeout)
    for r in results:
        line = f"{r.status:8s} {r.name}  ({r.seconds:.0f} s)"
        print(line + (f"  {r.error.splitlines()[0]}" if r.error else ""), file=sys.stderr)
    print(f"index: {Path(args.out).resolve() / 'index.html'}")
    return 1 if any(r.status == "failed" for r in results) else 0


@subcommand
def _register_phantom(sub: argparse._SubParsersAction) -> None:
    """``jule3d phantom OUT``: write a synthetic phantom (and its ground truth) to files."""
    from ..phantom import TEXTURE_NAMES, VARIANTS

    p = sub.add_parser(
        "phantom",
        help="write a synthetic phantom (texture, intensity or lung) and its ground-truth labels",
        description="Generate a deterministic phantom: a specimen in air whose tissue classes share mean and "
        f"variance and differ in texture ({', '.join(TEXTURE_NAMES)}); or, with --variant lung, the three classes "
        "of Moriya 2018 (normal alveolar tissue, lepidic and invasive carcinoma), which differ in the amount and "
        "arrangement of air. Voxel size 0.5 mm; the label map (0 = air, 1..K = classes) has the same geometry.",
    )
    p.add_argument("out", metavar="OUT.nii.gz", help="image file to write (.nii.gz, .nrrd, .mha, ...)")
    p.add_argument("--labels", metavar="LABELS.nii.gz", help="also write the ground-truth label map here")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--shape", type=int, nargs=3, default=(96, 96, 96), metavar=("Z", "Y", "X"),
                   help="array shape (default 96 96 96)")
    p.add_argument("--n-classes", type=int, metavar="K",
                   help="number of tissue classes (default 3, or the number of --textures)")
    p.add_argument("--variant", choices=VARIANTS, default="texture",
                   help="texture: classes differ in texture only (default); intensity: also in mean; "
                        "lung: normal / lepidic / invasive lung tissue (3 classes only)")
    p.add_argument("--textures", nargs="+", choices=TEXTURE_NAMES, metavar="NAME",
                   help="the texture of each class, one name per class; default: the first K "
                        f"of {', '.join(TEXTURE_NAMES)}")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")

    def run(args: argparse.Namespace) -> int:
        from ..phantom import write_phantom

        n_classes = args.n_classes if args.n_classes is not None else len(args.textures or ()) or 3
        phantom = write_phantom(args.out, args.labels, shape=tuple(args.shape), n_classes=n_classes,
                                variant=args.variant, seed=args.seed, textures=args.textures,
                                overwrite=args.overwrite)
        written = args.out + (f" and {args.labels}" if args.labels else "")
        print(f"jule3d phantom: wrote {written} (shape {phantom.volume.shape}, classes "
              f"{', '.join(phantom.class_names)})", file=sys.stderr)
        return 0

    p.set_defaults(func=run)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
