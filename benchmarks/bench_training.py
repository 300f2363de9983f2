"""Training throughput of the JULE 3D CNN presets, next to the machine's fp32 matmul speed.

Times one JULE training step (forward, weighted triplet loss on a random labelling with 5 clusters,
backward, SGD step) on random patches, for each network preset, with and without
``torch.channels_last_3d``, and prints a table::

    .venv/bin/python benchmarks/bench_training.py [--iters 5] [--batch-size 100] [--threads N]

"GFLOP/s" counts 3× the forward FLOPs per patch (forward + backward) and is compared with the
``torch.mm`` 2048² fp32 rate, the practical ceiling on a CPU.
"""

from __future__ import annotations

import argparse
import time

import torch

from jule3d.config import jule_config
from jule3d.loss import sample_triplets, weighted_triplet_loss
from jule3d.models import PRESETS, JuleNet3D


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    """Best-of-``repeats`` fp32 ``torch.mm`` rate on ``n × n`` matrices, in GFLOP/s."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def training_rate(preset: str, channels_last: bool, batch_size: int, iters: int) -> float:
    """Patches per second of full JULE training steps (median of ``iters`` timed steps after 2 warm-ups)."""
    config = jule_config(preset)
    model = JuleNet3D(PRESETS[preset])
    memory_format = torch.channels_last_3d if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format).train()
    optimizer = torch.optim.SGD(
        model.parameters(), lr=config.lr, momentum=config.momentum, dampening=config.dampening,
        weight_decay=config.weight_decay,
    )
    gen = torch.Generator().manual_seed(0)
    w = model.receptive_field
    x = torch.randn(batch_size, 1, w, w, w, generator=gen).contiguous(memory_format=memory_format)
    a, p, q = sample_triplets(torch.randint(0, 5, (batch_size,), generator=gen), config.n_negatives, gen)
    times = []
    for step in range(iters + 2):
        t0 = time.perf_counter()
        loss = weighted_triplet_loss(model(x), a, p, q, gamma=config.gamma, margin=config.margin)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step >= 2:
            times.append(time.perf_counter() - t0)
    times.sort()
    return batch_size / times[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=5, help="timed steps per configuration")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--presets", nargs="+", default=sorted(PRESETS), choices=sorted(PRESETS))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    peak = matmul_gflops()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; fp32 mm 2048²: {peak:.0f} GFLOP/s")
    print(f"{'preset':<8}{'channels_last':>15}{'patches/s':>12}{'GFLOP/s':>10}{'% of mm':>9}")
    for preset in args.presets:
        flops = 3 * JuleNet3D(PRESETS[preset]).flops_per_patch
        for channels_last in (False, True):
            rate = training_rate(preset, channels_last, args.batch_size, args.iters)
            gflops = rate * flops / 1e9
            print(f"{preset:<8}{str(channels_last):>15}{rate:>12.1f}{gflops:>10.1f}{100 * gflops / peak:>8.0f}%")


if __name__ == "__main__":
    main()
