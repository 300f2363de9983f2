"""Keep freed memory in the process while the same work is repeated step after step (glibc only).

Phase 1 and Phase 2 repeat the same work: a training step's activations and gradients, and in Phase 2 a
chunk's activations, feature block, joint features and their distances, tens to hundreds of MiB each, are
allocated and freed once per step or chunk. glibc serves allocations above its mmap threshold (at most
32 MiB) from fresh anonymous mappings and returns them to the kernel on ``free``, so every step faults in and
zeroes its whole working set again: about 10⁶ page faults per 256³ volume in Phase 2, a third to a half of
pass A's time on a virtual machine (``benchmarks/bench_scale.py`` measures it), and 1.5 to 25 million in the
Phase 1 of the default's two networks on the 96³ texture phantom, as many as glibc's history in the process
makes it map afresh: up to half of Phase 1's time (``benchmarks/bench_training.py --phase1``).
:func:`retained_heap` serves large allocations from the heap and keeps what is freed, so a step reuses the
previous step's pages; on leaving, the settings go back to glibc's defaults and the kept memory is returned
(``malloc_trim``). The resident memory then stays flat over the chunks, at what the largest of them needed:
0.25-0.7 GiB above glibc's way in ``jule3d segment`` at 256³ and 512 x 1024 x 1024, for a pass A 1.7 times
as fast. :func:`jule3d.jule.train_jule` and the Phase 2 stages run inside it.

This is what the PyTorch CPU tuning guide gets by preloading jemalloc or tcmalloc, without a dependency.
Elsewhere (macOS, Windows, musl) the context does nothing.
"""

from __future__ import annotations

import ctypes
import platform
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["retained_heap"]

# mallopt(3) parameters, and glibc's defaults (malloc/malloc.c)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_DEFAULTS = {_M_TRIM_THRESHOLD: 128 << 10, _M_MMAP_MAX: 65536}
_INT_MAX = 2**31 - 1

_lock = threading.Lock()
_depth = 0


def _libc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt.argtypes, libc.malloc_trim.argtypes = [ctypes.c_int, ctypes.c_int], [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):
        return None


@contextmanager
def retained_heap() -> Iterator[None]:
    """Serve large allocations from the heap and keep freed memory until the block ends.

    Re-entrant and thread-safe: the settings apply from the outermost entry to its exit. They are process-wide,
    so other threads' allocations meanwhile are kept too. Leaving restores glibc's default trim threshold and
    mmap count, with a fixed mmap threshold (as after any ``mallopt``).

    Examples
    --------
    >>> import numpy as np
    >>> from jule3d.allocator import retained_heap
    >>> with retained_heap():
    ...     total = sum(float(np.ones(1 << 22).sum()) for _ in range(3))  # the second array reuses the first's pages
    >>> total
    12582912.0
    """
    global _depth
    libc = _libc()
    with _lock:
        _depth += 1
        if _depth == 1 and libc is not None:
            libc.mallopt(_M_MMAP_MAX, 0)  # no allocation from a mapping of its own ...
            libc.mallopt(_M_TRIM_THRESHOLD, _INT_MAX)  # ... and no heap trimmed on free
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and libc is not None:
                for parameter, value in _DEFAULTS.items():
                    libc.mallopt(parameter, value)
                libc.malloc_trim(0)
