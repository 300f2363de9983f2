"""retained_heap: inside it, a chunk's large allocations reuse the previous chunk's pages; leaving returns them."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import numpy as np
import pytest

from jule3d import allocator
from jule3d.allocator import retained_heap

glibc = pytest.mark.skipif(allocator._libc() is None, reason="mallopt is glibc's")

SIZE = 64 << 20  # above glibc's largest mmap threshold (32 MiB)


# The fault counts run in a fresh interpreter: the heap of the test process holds whatever earlier tests left in
# it (free chunks that an earlier block kept below live memory serve a later request without a new mapping), so
# glibc's way there depends on the order of the tests.
# Each count is the quietest of three rounds of cycles. Inside the block one cycle now and then still faults
# its pages afresh: in one of five full runs of the suite, a round inside the block counted exactly one cycle's
# 16384 pages, and none in 150 runs of the measurement alone. Why is not known (a small allocation taking the
# front of the kept block between two cycles would do it). Without the block every cycle of every round faults
# afresh, so the quietest round still tells the two apart.
_MEASURE = """
import json, resource, sys
import numpy as np
import psutil
import torch
from jule3d.allocator import retained_heap

SIZE = int(sys.argv[2])
make = {"numpy": lambda: float(np.ones(SIZE // 8).sum()), "torch": lambda: float(torch.ones(SIZE // 4).sum())}[sys.argv[1]]


def faults(repeats=4, rounds=3):
    for _ in range(8):  # warm up: a heap takes a few cycles to hold a free block that the request fits
        make()
    counts = []
    for _ in range(rounds):
        start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(repeats):
            make()
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)
    return min(counts)


out = {"plain": faults()}
with retained_heap():
    out["kept"] = faults()
    with retained_heap():
        make()
    out["inner_left"] = faults()  # the outer block still keeps the memory
    out["rss_inside"] = psutil.Process().memory_info().rss
out["rss_after"] = psutil.Process().memory_info().rss
print(json.dumps(out))
"""


def _measure(make: str) -> dict:
    """Minor faults of allocate-touch-free cycles of ``SIZE`` bytes in a fresh interpreter: glibc's way, inside
    a block, left inside a nested block; and the RSS inside the block and after it."""
    run = subprocess.run([sys.executable, "-c", _MEASURE, make, str(SIZE)], capture_output=True, text=True, check=True)
    return json.loads(run.stdout.strip().splitlines()[-1])


@glibc
@pytest.mark.parametrize("make", ["numpy", "torch"])
def test_freed_memory_is_reused_inside_and_returned_outside(make):
    counts = _measure(make)
    # every cycle faults its pages in afresh (at least one fault per 2 MiB huge page) ...
    assert counts["plain"] >= 4 * SIZE // (2 << 20), counts
    # ... except inside the block, where the second cycle on reuses the first one's pages, also after a nested
    # block has ended (the outermost block decides)
    assert counts["kept"] <= counts["plain"] // 20 and counts["inner_left"] <= counts["plain"] // 20, counts
    # leaving the block returns the kept memory to the kernel
    assert counts["rss_inside"] - counts["rss_after"] >= SIZE // 2, counts


def test_elsewhere_it_does_nothing(monkeypatch):
    monkeypatch.setattr(platform, "system", lambda: "Darwin")
    assert allocator._libc() is None
    with retained_heap():
        float(np.ones(SIZE // 8).sum())
    assert allocator._depth == 0


def test_jule_training_runs_inside_the_block():
    """Phase 1 allocates and frees the same activations every step: train_jule holds the heap throughout."""
    from jule3d.config import jule_config
    from jule3d.jule import train_jule
    from jule3d.patches import sample_patches
    from jule3d.phantom import make_phantom

    phantom = make_phantom(shape=(24, 24, 24), seed=0)
    patches = sample_patches(phantom.volume, 40, patch_size=13, seed=0)
    config = jule_config("fast", epochs_per_period=1, final_epochs=1, k_s=3,
                         net_overrides={"n_filters": 4, "feature_dim": 8})
    depths: list[int] = []
    train_jule(patches, config, progress=False, callback=lambda record: depths.append(allocator._depth))
    assert depths and set(depths) == {1} and allocator._depth == 0
