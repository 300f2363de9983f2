"""Dense (fully convolutional) grid features vs cropping every patch, and the cost of a 256³ volume.

Prints:

1. On one volume and grid, seconds of ``grid_features(method="dense")`` and ``method="patchwise"`` (the
   patch-wise run is timed on a seeded subset of positions and scaled, when ``--patchwise-max`` is below the
   grid size), their ratio, and the largest difference between the two feature sets (they must agree).
2. Seconds and peak resident-memory growth of Phase 2 (``label_volume``: dense features, clustering,
   projection) on a ``--size``³ phantom with the preset's networks (two for ``fast``; untrained: the cost does
   not depend on the weights), once per Phase 2 method.

Usage::

    python benchmarks/bench_dense.py                 # defaults: 96³ comparison, 256³ Phase 2, stride 2
    python benchmarks/bench_dense.py --size 128 --json results/dense.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from jule3d.evaluation import measure
from jule3d.models import JuleNet3D, net_config
from jule3d.phantom import make_phantom
from jule3d.estimator import JuleSegmenter
from jule3d.segmentation import PHASE2_METHODS, grid_features, label_volume


def _model(preset: str, seed: int) -> JuleNet3D:
    model = JuleNet3D(net_config(preset), seed=seed)
    # non-trivial BatchNorm statistics, so the comparison exercises them
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm3d):
            module.running_mean.copy_(torch.rand(module.num_features, generator=generator) * 0.2 - 0.1)
            module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
    return model.eval()


def compare(preset: str, size: int, stride: int, patchwise_max: int, seed: int) -> dict:
    """Dense vs patch-wise on the same grid; patch-wise timed on at most ``patchwise_max`` positions."""
    volume = make_phantom(shape=(size,) * 3, seed=seed).volume
    model = _model(preset, seed)
    dense = measure(grid_features, model, volume, stride=stride, method="dense")
    n = len(dense.value.features)
    if n > patchwise_max:  # time the reference on a random subset of the foreground positions
        rng = np.random.default_rng(seed)
        keep = np.zeros(n, dtype=bool)
        keep[rng.choice(n, size=patchwise_max, replace=False)] = True
        sub_mask = np.zeros(volume.shape, dtype=bool)
        centres = dense.value.centers[keep]
        sub_mask[tuple(centres.T)] = True
        sub = volume.with_mask(sub_mask)
    else:
        keep, sub = np.ones(n, dtype=bool), volume
    patchwise = measure(grid_features, model, sub, stride=stride, method="patchwise")
    diff = float(np.abs(patchwise.value.features - dense.value.features[keep]).max())
    per_position_dense = dense.seconds / n
    per_position_patch = patchwise.seconds / keep.sum()
    return {
        "preset": preset, "volume": size, "stride": stride, "positions": n,
        "patchwise_positions_timed": int(keep.sum()),
        "dense_s": dense.seconds, "dense_peak_mb": dense.peak_mb,
        "patchwise_s_per_1000": 1000 * per_position_patch,
        "patchwise_s_extrapolated": per_position_patch * n,
        "speedup": per_position_patch / per_position_dense,
        "max_abs_diff": diff,
    }


def phase2(preset: str, size: int, stride: int, seed: int) -> dict:
    """Seconds and peak memory of label_volume on a size³ phantom, with the preset's networks, per Phase 2 method."""
    t0 = time.perf_counter()
    volume = make_phantom(shape=(size,) * 3, seed=seed).volume
    make_s = time.perf_counter() - t0
    n_networks = JuleSegmenter(preset=preset).resolved_networks()
    models = [_model(preset, seed + i) for i in range(n_networks)]
    methods = {}
    for method in PHASE2_METHODS:
        run = measure(label_volume, models, volume, 3, stride=stride, seed=seed, phase2=method)
        methods[method] = {"label_volume_s": run.seconds, "label_volume_peak_mb": run.peak_mb}
    return {"preset": preset, "volume": size, "stride": stride, "phantom_s": make_s, "n_networks": n_networks,
            "methods": methods, "foreground_fraction": float(volume.mask.mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="fast", choices=["fast", "paper"])
    parser.add_argument("--compare-size", type=int, default=96, help="side of the dense vs patch-wise volume")
    parser.add_argument("--size", type=int, default=256, help="side of the Phase 2 volume")
    parser.add_argument("--stride", type=int, default=2)
    parser.add_argument("--patchwise-max", type=int, default=4000,
                        help="time the patch-wise reference on at most this many positions")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    print(f"cores: {os.cpu_count()}, torch threads: {torch.get_num_threads()}, torch {torch.__version__}")

    cmp = compare(args.preset, args.compare_size, args.stride, args.patchwise_max, args.seed)
    print(f"\n## dense vs patch-wise, {args.preset} preset, {cmp['volume']}³ phantom, stride {cmp['stride']}")
    print(f"grid positions in the foreground: {cmp['positions']:,}")
    print(f"dense:      {cmp['dense_s']:8.2f} s for all positions (peak +{cmp['dense_peak_mb']:.0f} MB)")
    print(f"patch-wise: {cmp['patchwise_s_per_1000']:8.2f} s per 1000 positions "
          f"(timed on {cmp['patchwise_positions_timed']:,}; {cmp['patchwise_s_extrapolated']:.1f} s for all)")
    print(f"speed-up dense / patch-wise: {cmp['speedup']:.0f}x;  max |difference|: {cmp['max_abs_diff']:.2e}")
    assert cmp["max_abs_diff"] < 1e-4, "dense and patch-wise features disagree"

    p2 = phase2(args.preset, args.size, args.stride, args.seed)
    print(f"\n## Phase 2 on a {p2['volume']}³ phantom ({p2['foreground_fraction']:.0%} foreground), "
          f"{args.preset} preset, stride {p2['stride']}")
    for method, run in p2["methods"].items():
        print(f"label_volume, {p2['n_networks']} network(s), phase2={method}: {run['label_volume_s']:.1f} s, "
              f"peak +{run['label_volume_peak_mb']:.0f} MB")
    print(f"(phantom generation {p2['phantom_s']:.1f} s, not included)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"compare": cmp, "phase2": p2}, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
