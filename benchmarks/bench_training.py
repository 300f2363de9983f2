"""Training throughput of the JULE 3D CNN presets, next to the machine's fp32 matmul speed.

Times one JULE training step (forward, weighted triplet loss on a random labelling with 5 clusters,
backward, SGD step) on random patches, for each network preset, with and without
``torch.channels_last_3d``, and prints a table::

    .venv/bin/python benchmarks/bench_training.py [--iters 5] [--batch-size 100] [--threads N]

"GFLOP/s" counts 3× the forward FLOPs per patch (forward + backward) and is compared with the
``torch.mm`` 2048² fp32 rate, the practical ceiling on a CPU.

``--phase1 SEED`` instead times the default's whole Phase 1 (``JuleSegmenter.fit`` on the 96³ texture
phantom, two networks) with glibc's allocator settings and inside :func:`jule3d.allocator.retained_heap` (what
:func:`jule3d.jule.train_jule` does), alternately, each run in a fresh process (glibc's mmap threshold depends
on the process's history): seconds, minor page faults, system time, the peak RSS of the process sampled
from outside, whether the networks are identical, and the ratio::

    .venv/bin/python benchmarks/bench_training.py --phase1 0 --repeats 3
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

from jule3d.config import jule_config
from jule3d.loss import sample_triplets, weighted_triplet_loss
from jule3d.models import PRESETS, JuleNet3D

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_quality's phantom, bench_scale's sampler


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


def phase1_run(way: str, seed: int) -> dict:
    """One Phase 1 of the default on the texture phantom, in this (fresh) process, ``way`` being
    ``"retained_heap"`` or ``"glibc"`` (``train_jule`` without its context): seconds, minor faults, system CPU
    seconds and a digest of the trained networks."""
    import hashlib

    from bench_quality import phantom_case

    import jule3d.jule
    from jule3d.estimator import JuleSegmenter

    case = phantom_case("texture")
    if way == "glibc":
        jule3d.jule.train_jule = jule3d.jule.train_jule.__wrapped__
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    fitted = JuleSegmenter(n_clusters=case.n_clusters, seed=seed).fit(case.volume)
    seconds, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
    digest = hashlib.sha256()
    for model in fitted.models_:
        for value in model.state_dict().values():
            digest.update(value.detach().numpy().tobytes())
    return {"way": way, "seed": seed, "seconds": seconds, "faults": after.ru_minflt - before.ru_minflt,
            "system": after.ru_stime - before.ru_stime, "networks": digest.hexdigest()}


def phase1_allocator(seed: int, repeats: int) -> None:
    """``phase1_run`` of both ways, alternately, each in a process of its own (glibc's mmap threshold adapts
    to the process's history, and ``retained_heap`` fixes it, so the two cannot share a process), with the
    peak RSS of that process sampled from outside (:func:`bench_scale.run_sampled`)."""
    import json

    from bench_scale import run_sampled

    runs = []
    for _ in range(repeats):
        for way in ("glibc", "retained_heap"):
            sampled = run_sampled([sys.executable, __file__, "--phase1-run", way, str(seed)])
            if sampled["returncode"] != 0:
                raise RuntimeError(f"--phase1-run {way} failed: {sampled['stderr'].strip().splitlines()[-1:]}")
            run = json.loads(sampled["stdout"].strip().splitlines()[-1])
            run["peak_gib"] = sampled["peak_rss_bytes"] / 2**30
            runs.append(run)
            print(f"{way}: {run['seconds']:.1f} s, {run['faults'] / 1e6:.2f} M minor faults, system "
                  f"{run['system']:.1f} s, peak RSS {run['peak_gib']:.2f} GiB", flush=True)
    base, new = ([r["seconds"] for r in runs if r["way"] == way] for way in ("glibc", "retained_heap"))
    print(f"\nPhase 1 of the default (seed {seed}) on the 96³ texture phantom, {repeats} processes each: glibc's "
          f"way {np.mean(base):.1f} s ({min(base):.1f}-{max(base):.1f}), retained_heap {np.mean(new):.1f} s "
          f"({min(new):.1f}-{max(new):.1f}), ratio {np.mean(new) / np.mean(base):.2f}; identical networks: "
          f"{len({r['networks'] for r in runs}) == 1}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=5, help="timed steps per configuration")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--presets", nargs="+", default=sorted(PRESETS), choices=sorted(PRESETS))
    parser.add_argument("--phase1", type=int, metavar="SEED",
                        help="time the default's Phase 1 with and without retained_heap instead (see above)")
    parser.add_argument("--repeats", type=int, default=3, help="processes of each way for --phase1")
    parser.add_argument("--phase1-run", nargs=2, metavar=("WAY", "SEED"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase1_run:
        import json

        print(json.dumps(phase1_run(args.phase1_run[0], int(args.phase1_run[1]))))
        return
    if args.phase1 is not None:
        phase1_allocator(args.phase1, args.repeats)
        return
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
