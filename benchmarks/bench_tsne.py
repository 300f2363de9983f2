"""t-SNE of patch features: seconds for N features with openTSNE, by thread count.

Features are the ``fast`` network's 64-d outputs for N phantom patches (untrained weights by default, or a
trained model with ``--model``), embedded with jule3d's settings (250 + 250 iterations). Target: 20,000
features in at most 20 s on 2 cores. With ``--model`` and the phantom's truth, the silhouette of the true
classes in the layout is printed too, to show the shorter schedule keeps the layout.

Usage::

    python benchmarks/bench_tsne.py                       # N = 2,000 and 20,000; n_jobs 1 and -1
    python benchmarks/bench_tsne.py --sizes 20000 --jobs -1 --n-iter 250 500 --model runs/demo/model.pt
"""

from __future__ import annotations

import argparse
import os


from jule3d.embedding import embed, embedding_scores
from jule3d.checkpoint import load_model
from jule3d.models import JuleNet3D, net_config
from jule3d.patches import sample_patches
from jule3d.phantom import make_phantom


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000])
    parser.add_argument("--jobs", type=int, nargs="+", default=[1, -1], help="openTSNE n_jobs values to compare")
    parser.add_argument("--n-iter", type=int, nargs="+", default=[250], help="iterations after early exaggeration")
    parser.add_argument("--model", help="trained model (jule3d.checkpoint.save_model); default: untrained fast network")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    phantom = make_phantom(shape=(96, 96, 96), seed=args.seed)
    model = load_model(args.model) if args.model else JuleNet3D(net_config("fast"), seed=args.seed)
    patches = sample_patches(phantom.volume, max(args.sizes), patch_size=model.config.patch_size,
                             min_foreground=0.5, seed=args.seed)
    truth = phantom.labels[tuple(patches.centers.T)]
    features = model.embed(patches.patches)
    print(f"cores: {os.cpu_count()}; features: {features.shape[1]}-d, {'trained' if args.model else 'untrained'}")
    print(f"{'N':>8s} {'n_iter':>7s} {'n_jobs':>7s} {'seconds':>8s} {'silhouette':>11s}")
    for n in args.sizes:
        for n_iter in args.n_iter:
            for jobs in args.jobs:
                e = embed(features[:n], seed=args.seed, n_jobs=jobs, n_iter=n_iter)
                score = embedding_scores(e.coords, truth[:n], seed=args.seed)
                print(f"{n:8d} {n_iter:7d} {jobs:7d} {e.seconds:8.1f} {score:11.3f}")


if __name__ == "__main__":
    main()
