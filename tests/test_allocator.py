"""retained_heap: inside it, a chunk's large allocations reuse the previous chunk's pages; outside, glibc's way."""

from __future__ import annotations

import platform
import resource

import numpy as np
import pytest
import torch

from jule3d import allocator
from jule3d.allocator import retained_heap

glibc = pytest.mark.skipif(allocator._libc() is None, reason="mallopt is glibc's")

SIZE = 64 << 20  # above glibc's largest mmap threshold (32 MiB)


def _faults(make, repeats: int = 4) -> int:
    """Minor page faults of ``repeats`` allocate-touch-free cycles of ``SIZE`` bytes, after eight to warm up (a
    heap already fragmented by earlier tests takes a few cycles to hold a free block that an aligned request of
    the size fits)."""
    for _ in range(8):
        make()
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(repeats):
        make()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start


def _numpy() -> None:
    float(np.ones(SIZE // 8).sum())


def _torch() -> None:
    float(torch.ones(SIZE // 4).sum())


@glibc
@pytest.mark.parametrize("make", [_numpy, _torch], ids=["numpy", "torch"])
def test_freed_memory_is_reused_inside_and_returned_outside(make):
    plain = _faults(make)
    with retained_heap():
        kept = _faults(make)
    after = _faults(make)
    # every cycle faults its pages in afresh (at least one fault per 2 MiB huge page) ...
    assert plain >= 4 * SIZE // (2 << 20) and after >= 4 * SIZE // (2 << 20)
    # ... except inside the block, where the second cycle on reuses the first one's pages
    assert kept <= plain // 20, (plain, kept, after)


@glibc
def test_the_outermost_block_decides():
    with retained_heap():
        with retained_heap():
            _numpy()
        inner_left = _faults(_numpy)  # the outer block still keeps the memory
    assert inner_left <= _faults(_numpy) // 20


def test_elsewhere_it_does_nothing(monkeypatch):
    monkeypatch.setattr(platform, "system", lambda: "Darwin")
    assert allocator._libc() is None
    with retained_heap():
        _numpy()
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
