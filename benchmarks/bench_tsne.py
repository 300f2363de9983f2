"""t-SNE of patch features: seconds for N features with openTSNE, by thread count.

Features are the ``fast`` network's 64-d outputs for N phantom patches (untrained weights: the cost of
t-SNE does not depend on what the features mean). Target: 20,000 features in at most 20 s on 2 cores.

Usage::

    python benchmarks/bench_tsne.py                       # N = 2,000 and 20,000; n_jobs 1 and -1
    python benchmarks/bench_tsne.py --sizes 5000 --jobs 1
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from jule3d.embedding import embed
from jule3d.models import JuleNet3D, net_config
from jule3d.patches import sample_patches
from jule3d.phantom import make_phantom


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000])
    parser.add_argument("--jobs", type=int, nargs="+", default=[1, -1], help="openTSNE n_jobs values to compare")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    volume = make_phantom(shape=(96, 96, 96), seed=args.seed).volume
    model = JuleNet3D(net_config("fast"), seed=args.seed)
    patches = sample_patches(volume, max(args.sizes), patch_size=model.config.patch_size, min_foreground=0.5,
                             seed=args.seed)
    features = model.embed(patches.patches)
    print(f"cores: {os.cpu_count()}; features: {features.shape[1]}-d from the fast network")
    print(f"{'N':>8s} {'n_jobs':>7s} {'seconds':>8s}")
    for n in args.sizes:
        for jobs in args.jobs:
            e = embed(features[:n], seed=args.seed, n_jobs=jobs)
            print(f"{n:8d} {jobs:7d} {e.seconds:8.1f}")


if __name__ == "__main__":
    main()
