"""Keep freed memory in a training process instead of returning it to the kernel (glibc ``mallopt``).

Every CPU training step allocates and frees the same large activation buffers; with glibc's defaults each buffer
above 128 KiB is a fresh ``mmap`` that page-faults on first touch. PyTorch's performance tuning guide and Intel's
Extension for PyTorch guide recommend an allocator that reuses memory (jemalloc, tcmalloc) for CPU training; raising
glibc's mmap and trim thresholds gets the same reuse with no new dependency. mpbench applies it in every process
that trains (``MPBENCH_MALLOC_TUNE=0`` opts out); the cost is that a process keeps its peak heap until it exits.
"""
from __future__ import annotations

import ctypes
import ctypes.util

from mpbench.config import env_opted_out

_TUNED: dict[str, bool] = {}
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def tune_malloc(threshold: int = 1 << 30) -> bool:
    """Allocations up to ``threshold`` bytes come from the heap and freed memory stays there (process-wide, cannot
    be undone); False where it does not apply (not glibc)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, int(threshold))) and bool(
            libc.mallopt(M_TRIM_THRESHOLD, 2 * int(threshold)))
    except (OSError, AttributeError):
        return False


def tune_for_training() -> bool:
    """:func:`tune_malloc` once per process unless ``MPBENCH_MALLOC_TUNE=0``; whether it is in effect."""
    if "tuned" not in _TUNED:
        _TUNED["tuned"] = False if env_opted_out("MPBENCH_MALLOC_TUNE") else tune_malloc()
    return _TUNED["tuned"]
