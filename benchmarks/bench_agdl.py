"""Benchmark of jule3d.agdl: kNN affinity, initial clusters and AGDL merging down to a few clusters.

For each size ``n`` the features are a seeded mixture of clusters in 160-d, L2-normalised (the shape
of JULE's CNN features). The script times, separately, the kNN affinity (:func:`knn_affinity`), the
initial clusters (:func:`initial_clusters`) and the merging from the initial clusters to
``--target`` clusters (:func:`agglomerate`). For sizes up to ``--skip-reference-above`` it also runs
the slow :func:`agglomerate_reference` in the same process, prints the speed-up and checks that both
give the identical merge sequence (the script fails otherwise).

Example::

    python benchmarks/bench_agdl.py --sizes 2000 20000 100000 --skip-reference-above 2000
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import numpy as np

from jule3d.agdl import agglomerate, agglomerate_reference, initial_clusters, knn_affinity

T = TypeVar("T")


@dataclass
class Row:
    """Timings (seconds) and counts for one size."""

    n: int
    knn_s: float
    init_s: float
    clusters: int
    merge_s: float
    reference_s: float | None = None
    identical: bool | None = None


def mixture_features(n: int, dim: int, n_centers: int, noise: float, seed: int) -> np.ndarray:
    """``n`` L2-normalised float32 samples drawn around ``n_centers`` random centres."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_centers, dim))
    x = centers[rng.integers(0, n_centers, n)] + noise * rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _timed(function: Callable[..., T], *args: Any, **kwargs: Any) -> tuple[T, float]:
    """Call ``function`` and return its result and the wall-clock seconds it took."""
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start


def run_size(n: int, args: argparse.Namespace) -> Row:
    """Benchmark one size; run and compare the reference when ``n`` is small enough."""
    x = mixture_features(n, args.dim, args.centers, args.noise, args.seed)
    W, knn_s = _timed(knn_affinity, x, args.k_s)
    labels, init_s = _timed(initial_clusters, W)
    clusters = int(labels.max()) + 1
    (_, merges), merge_s = _timed(agglomerate, W, labels, args.target, K_c=args.k_c, return_merges=True)
    row = Row(n, knn_s, init_s, clusters, merge_s)
    print(f"n={n}: kNN {knn_s:.2f} s, {clusters} initial clusters in {init_s:.2f} s, "
          f"{len(merges)} merges to {args.target} clusters in {merge_s:.2f} s", flush=True)
    if n <= args.skip_reference_above:
        (_, ref_merges), row.reference_s = _timed(
            agglomerate_reference, W, labels, args.target, K_c=args.k_c, return_merges=True
        )
        row.identical = ref_merges == merges
        print(f"n={n}: reference {row.reference_s:.2f} s, speed-up x{row.reference_s / merge_s:.1f}, "
              f"identical merge sequence: {row.identical}", flush=True)
    return row


def print_table(rows: list[Row]) -> None:
    """Print the results as a plain-text table."""
    names = [("n", 8), ("kNN s", 8), ("init s", 7), ("clusters", 9), ("merge s", 8), ("ref s", 8), ("ratio", 7),
             ("same", 5)]
    header = " ".join(f"{name:>{width}}" for name, width in names)
    print("\n" + header + "\n" + "-" * len(header))
    for r in rows:
        ref = "-" if r.reference_s is None else f"{r.reference_s:.2f}"
        ratio = "-" if r.reference_s is None else f"{r.reference_s / r.merge_s:.1f}"
        same = "-" if r.identical is None else ("yes" if r.identical else "NO")
        print(f"{r.n:>8} {r.knn_s:>8.2f} {r.init_s:>7.2f} {r.clusters:>9} {r.merge_s:>8.2f} {ref:>8} "
              f"{ratio:>7} {same:>5}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000, 100000], help="numbers of samples")
    p.add_argument("--skip-reference-above", type=int, default=2000,
                   help="run the slow reference only for sizes up to this")
    p.add_argument("--target", type=int, default=3, help="clusters to merge down to")
    p.add_argument("--k-s", type=int, default=20, help="K_s nearest neighbours")
    p.add_argument("--k-c", type=int, default=5, help="K_c of the merge criterion")
    p.add_argument("--dim", type=int, default=160, help="feature dimension")
    p.add_argument("--centers", type=int, default=30, help="mixture components of the synthetic features")
    p.add_argument("--noise", type=float, default=1.5, help="noise around the centres (before normalising)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic features")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark for every size, print the table, fail on a merge-sequence mismatch."""
    args = parse_args(argv)
    rows = [run_size(n, args) for n in args.sizes]
    print_table(rows)
    if any(r.identical is False for r in rows):
        raise SystemExit("agglomerate and agglomerate_reference gave different merge sequences")


if __name__ == "__main__":
    main()
