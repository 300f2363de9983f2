"""How ``jule3d segment`` scales with the volume: wall time, peak memory of the process tree, and Phase 2's FLOP rate.

For every ``--sizes`` entry (``256`` = 256³, ``512x1024x1024`` = Z × Y × X) this script

1. generates a textured specimen in air (:func:`write_specimen`: the tissue of a small
   :func:`jule3d.phantom.make_phantom`, tiled into one cylinder, stored as ``uint16`` in an uncompressed NIfTI
   slab by slab, as micro-CT comes),
2. runs ``jule3d segment`` on it in a subprocess with the default settings and ``--n-clusters 3``, and samples
   the resident memory of the whole process tree every 0.2 s (psutil),
3. prints wall seconds, peak RSS (GiB, and as a multiple of the file), voxels per second, the run's own log
   (one line per stage, each with the peak RSS since the line before: the stage's) and the GFLOP/s of its dense
   features (pass A: featured positions x FLOPs per position / seconds).

Then, in this process, it measures Phase 2's arithmetic against the machine: the FLOPs of the default network's
dense features per grid position (counted by ``torch.utils.flop_counter``), the seconds of
:func:`jule3d.segmentation.grid_features` on a ``--flop-size``³ phantom, hence GFLOP/s, next to the fp32 matmul
rate measured here (the physical floor) and their ratio. The FLOPs count every grid position; chunks without
foreground are skipped, so on a sparse specimen the rate is an upper bound.

Usage::

    python benchmarks/bench_scale.py                         # 256³
    python benchmarks/bench_scale.py --sizes 256 512 512x1024x1024 --json results/scale.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import psutil
import torch

from jule3d.chunked import DENSE_CHUNK
from jule3d.models import JuleNet3D, net_config
from jule3d.phantom import make_phantom
from jule3d.segmentation import grid_features

TILE = 96  #: side of the phantom that is tiled to the requested shape


def parse_size(text: str) -> tuple[int, int, int]:
    """``"256"`` → ``(256, 256, 256)``; ``"512x1024x1024"`` → ``(512, 1024, 1024)`` (Z, Y, X)."""
    parts = [int(p) for p in text.lower().split("x")]
    if len(parts) == 1:
        parts *= 3
    if len(parts) != 3 or min(parts) < 32:
        raise argparse.ArgumentTypeError(f"size must be N or ZxYxX with sides >= 32, got {text!r}")
    return tuple(parts)  # type: ignore[return-value]


def specimen_tile(seed: int = 0) -> np.ndarray:
    """A ``TILE``³ uint16 block of the texture phantom's tissue with no air: the phantom's air voxels take the
    values of the phantom shifted by half a tile (then a quarter), so tiled blocks form one connected specimen."""
    phantom = make_phantom(shape=(TILE,) * 3, seed=seed)
    data, air = phantom.volume.data[0].copy(), phantom.labels == 0
    for shift in (TILE // 2, TILE // 4, TILE // 8):
        moved, moved_air = np.roll(data, shift, axis=(0, 1, 2)), np.roll(air, shift, axis=(0, 1, 2))
        fill = air & ~moved_air
        data[fill], air = moved[fill], air & moved_air
    data[air] = data[~air].mean()
    return np.clip((data - data.min()) / (np.ptp(data) or 1.0) * 3000 + 2000, 0, 65535).astype(np.uint16)


def write_specimen(shape: tuple[int, int, int], path: Path, seed: int = 0) -> Path:
    """A textured cylindrical specimen in air (micro-CT in a tube: radius 0.46 of the smaller in-plane side,
    64 % of the voxels), ``uint16``, written slab by slab into an uncompressed NIfTI (bounded memory)."""
    from jule3d.chunked import write_nifti
    from jule3d.volume import Geometry

    tile = specimen_tile(seed)
    rng = np.random.default_rng(seed)
    y, x = np.ogrid[: shape[1], : shape[2]]
    radius = 0.46 * min(shape[1:])
    outside = (y - shape[1] / 2) ** 2 + (x - shape[2] / 2) ** 2 > radius**2
    reps = [-(-s // TILE) for s in shape[1:]]
    staging = np.lib.format.open_memmap(path.with_suffix(".npy"), mode="w+", dtype=np.uint16, shape=shape)
    for z in range(shape[0]):
        plane = np.tile(tile[z % TILE], reps)[: shape[1], : shape[2]]
        plane[outside] = rng.normal(300, 30, size=int(outside.sum())).clip(0).astype(np.uint16)
        staging[z] = plane
    write_nifti(staging, Geometry(shape=shape, spacing=(0.03, 0.03, 0.03)), path, compress=False)
    del staging
    path.with_suffix(".npy").unlink()
    return path


def _tree_rss(process: psutil.Process) -> int:
    total = 0
    for p in [process, *process.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def run_sampled(command: Sequence[str], interval: float = 0.2) -> dict:
    """Run ``command`` in a subprocess, sampling the RSS of its process tree every ``interval`` seconds: wall
    seconds, peak RSS, return code, stdout and stderr, and ``line_peaks``: for every line of stderr, the peak RSS
    since the line before (for a command that logs one line as each stage ends, the stage's peak)."""
    start = time.perf_counter()
    proc = subprocess.Popen(list(command), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ps, done, lock = psutil.Process(proc.pid), threading.Event(), threading.Lock()
    peak, since = [0], [0]  # the whole run's peak, the peak since the last line of stderr
    out: list[str] = []
    lines: list[tuple[str, int]] = []

    def seen(rss: int) -> None:
        with lock:
            peak[0], since[0] = max(peak[0], rss), max(since[0], rss)

    def sample() -> None:
        while not done.is_set():
            try:
                seen(_tree_rss(ps))
            except psutil.NoSuchProcess:
                return
            done.wait(interval)

    def read_stderr() -> None:
        for line in proc.stderr:  # type: ignore[union-attr]
            try:
                seen(_tree_rss(ps))  # the stage may have been shorter than the interval
            except psutil.NoSuchProcess:
                pass
            with lock:
                lines.append((line.rstrip("\n"), since[0]))
                since[0] = 0

    threads = [threading.Thread(target=target, daemon=True) for target in
               (sample, read_stderr, lambda: out.append(proc.stdout.read()))]  # type: ignore[union-attr]
    for thread in threads:
        thread.start()
    proc.wait()
    threads[1].join()
    threads[2].join()
    done.set()
    threads[0].join()
    return {"seconds": time.perf_counter() - start, "peak_rss_bytes": peak[0], "returncode": proc.returncode,
            "stdout": "".join(out), "stderr": "\n".join(line for line, _ in lines), "line_peaks": lines}


def run_segment(image: Path, out: Path, extra: Sequence[str] = ()) -> dict:
    """``jule3d segment`` in a subprocess: wall seconds, the peak RSS of its process tree (sampled), its stage
    lines and the peak RSS of each stage (the peak since the line before)."""
    run = run_sampled([sys.executable, "-m", "jule3d.app.cli", "segment", str(image), "--out", str(out),
                       "--n-clusters", "3", *extra])
    if run["returncode"] != 0:
        raise RuntimeError(f"jule3d segment failed ({run['returncode']}): {run['stderr'].strip().splitlines()[-1:]}")
    stages = [(line, rss) for line, rss in run["line_peaks"] if line.startswith("jule3d")]  # its one line a stage
    return {"seconds": run["seconds"], "peak_rss_bytes": run["peak_rss_bytes"], "log": [line for line, _ in stages],
            "stage_peak_rss_bytes": [rss for _, rss in stages]}


def features_rate(log: Sequence[str], mflop_per_position: float) -> float | None:
    """GFLOP/s of pass A (the dense features) of a run, from its log: positions x networks x FLOPs / seconds."""
    import re

    found = [(int(m.group(1)), int(m.group(2))) for line in log
             if (m := re.search(r"features of (\d+) grid positions x (\d+) network", line))]
    seconds = [float(m.group(1)) for line in log if (m := re.search(r"Phase 2 features: .* in ([0-9.]+) s", line))]
    if not found or not seconds:
        return None
    positions, networks = found[0]
    return positions * networks * mflop_per_position * 1e6 / seconds[0] / 1e9


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    """The fp32 matrix-multiply rate of this machine (best of ``repeats``), in GFLOP/s."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def flops_per_position(model: JuleNet3D, stride: int) -> float:
    """FLOPs of the dense features per grid position at ``stride``, the arithmetic a position needs at the least.

    The FLOPs of a block of ``P`` native positions a side are a cubic in ``P`` (the halo adds the lower terms);
    its leading coefficient, from the third difference of four block sizes, is the cost per position of an
    unbounded block. They are counted (``torch.utils.flop_counter``) on the network layer by layer (``body``,
    then the head as a convolution), not on :meth:`~jule3d.models.JuleNet3D.dense`, whose pooled first
    convolution does more arithmetic to run faster.
    """
    from torch.utils.flop_counter import FlopCounterMode

    w, native, k = model.config.patch_size, model.stride, model.config.head_size
    head = model.head.weight.view(model.feature_dim, -1, k, k, k)

    def block_flops(positions: int) -> float:
        side = (positions - 1) * native + w
        x = torch.zeros(1, model.config.in_channels, side, side, side)
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            torch.nn.functional.conv3d(model.body(x), head, model.head.bias)
        return counter.get_total_flops()

    step = 4
    f = [block_flops(8 + i * step) for i in range(4)]
    per_native = (f[3] - 3 * f[2] + 3 * f[1] - f[0]) / (6 * step**3)
    # a finer stride runs (native / stride)³ shifted passes; a coarser one subsamples the native grid
    return per_native * (native / stride) ** 3 if stride < native else per_native


def phase2_rate(size: int, stride: int = 2, seed: int = 0) -> dict:
    """GFLOP/s of the default network's grid features on a ``size``³ phantom, in blocks of the chunked engine's
    ``DENSE_CHUNK`` positions a side, against the matmul rate."""
    model = JuleNet3D(net_config("fast"), seed=seed).eval()
    volume = make_phantom(shape=(size,) * 3, seed=seed).volume
    features = grid_features(model, volume, stride=stride, chunk=DENSE_CHUNK)  # also the warm-up
    seconds = min(_timed(lambda: grid_features(model, volume, stride=stride, chunk=DENSE_CHUNK)) for _ in range(3))
    n_positions = int(features.selected.sum())
    per_position = flops_per_position(model, stride)
    flops = per_position * int(np.prod(features.grid_shape))  # dense runs the whole block
    rate, floor = flops / seconds / 1e9, matmul_gflops()
    return {"size": size, "stride": stride, "positions": n_positions, "mflop_per_position":
            per_position / 1e6, "seconds": seconds, "gflops": rate,
            "matmul_gflops": floor, "fraction_of_matmul": rate / floor}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", type=parse_size, default=[(256, 256, 256)], metavar="N|ZxYxX")
    parser.add_argument("--flop-size", type=int, default=96, help="phantom side for the FLOP-rate measurement")
    parser.add_argument("--segment-args", nargs=argparse.REMAINDER, default=[],
                        help="further options of jule3d segment (last on the line)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    rows = []
    mflop = flops_per_position(JuleNet3D(net_config("fast"), seed=0).eval(), 2) / 1e6
    with tempfile.TemporaryDirectory() as folder:
        for shape in args.sizes:
            image = write_specimen(shape, Path(folder) / "specimen.nii")
            file_bytes = os.path.getsize(image)
            labels = Path(folder) / "labels.nii.gz"
            run = run_segment(image, labels, args.segment_args)
            labels.unlink()
            voxels = int(np.prod(shape))
            gflops = features_rate(run["log"], mflop)
            rows.append({"shape": list(shape), "file_bytes": file_bytes, **run, "voxels_per_second": voxels / run["seconds"],
                         "features_gflops": gflops})
            print(f"{'x'.join(map(str, shape))}: {run['seconds']:.1f} s, peak RSS {run['peak_rss_bytes'] / 2**30:.2f} GiB "
                  f"({run['peak_rss_bytes'] / file_bytes:.1f} x the file), {voxels / run['seconds'] / 1e6:.3f} Mvoxel/s"
                  + ("" if gflops is None else f", Phase 2 features {gflops:.1f} GFLOP/s"), flush=True)
            for line, rss in zip(run["log"], run["stage_peak_rss_bytes"]):
                print("   ", line, f"(peak RSS {rss / 2**30:.2f} GiB)", flush=True)
            image.unlink()
    rate = phase2_rate(args.flop_size)
    print(f"Phase 2 dense features ({args.flop_size}³, fast network, stride 2): {rate['mflop_per_position']:.3f} MFLOP "
          f"per grid position, {rate['gflops']:.1f} GFLOP/s; fp32 matmul {rate['matmul_gflops']:.1f} GFLOP/s; "
          f"ratio {rate['fraction_of_matmul']:.2f}")
    for row in rows:  # the runs' own pass A: reading, halos and class distances included
        if row["features_gflops"] is not None:
            row["features_fraction_of_matmul"] = row["features_gflops"] / rate["matmul_gflops"]
            print(f"{'x'.join(map(str, row['shape']))}: pass A {row['features_gflops']:.1f} GFLOP/s, "
                  f"{row['features_fraction_of_matmul']:.2f} of the matmul rate")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"runs": rows, "phase2": rate}, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
