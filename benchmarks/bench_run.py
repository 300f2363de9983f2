"""`jule3d run` on the bundled phantom: wall time per notebook, time inside cells, and kernel overhead.

The overhead of a notebook (kernel start, parameter injection, saving) is its wall time minus the sum of
its cells' durations as papermill records them; an empty notebook executed in the same process gives the
bare kernel-start cost to compare with. Target: the whole run, report included, in at most 5 minutes on
2 cores with the ``fast`` preset.

Usage::

    python benchmarks/bench_run.py --out /tmp/bench-run          # default parameters (the README's main job)
    python benchmarks/bench_run.py --out /tmp/r -p n_patches 1000
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import nbformat
import papermill
import yaml

from jule3d.app.pipeline import run_pipeline


def kernel_start_seconds() -> float:
    """Wall time of executing a one-cell notebook with papermill: the bare per-notebook overhead."""
    with tempfile.TemporaryDirectory() as tmp:
        nb = nbformat.v4.new_notebook()
        nb.cells.append(nbformat.v4.new_code_cell("1 + 1"))
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        src, dst = Path(tmp) / "empty.ipynb", Path(tmp) / "out.ipynb"
        nbformat.write(nb, src)
        start = time.perf_counter()
        papermill.execute_notebook(str(src), str(dst), kernel_name="python3", progress_bar=False)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="run folder (replaced)")
    parser.add_argument("-p", "--param", nargs=2, action="append", metavar=("NAME", "VALUE"), default=[])
    args = parser.parse_args()
    params = {name: yaml.safe_load(value) for name, value in args.param}
    empty = kernel_start_seconds()
    start = time.perf_counter()
    result = run_pipeline(args.out, parameters=params, overwrite=True, progress=False)
    total = time.perf_counter() - start
    print(f"cores: {os.cpu_count()}; parameters: {params or 'defaults'}")
    print(result.timing_table())
    print(f"empty notebook through papermill (kernel start + save): {empty:.1f} s")
    print(f"jule3d run total: {total:.1f} s ({total / 60:.1f} min), report {result.report}")


if __name__ == "__main__":
    main()
