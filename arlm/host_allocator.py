"""The C library's allocator, set for a model that runs on the CPU.

glibc's malloc serves a request of 128 KiB or more with pages mapped for it and unmapped when it
is freed, and returns the top of its heap to the system once 128 KiB of it is free; it raises
both thresholds only as it sees large blocks freed. A forward on the CPU allocates its
activations anew every step (a 512-token chunk's MLP output of GPT-2 124M is 6 MiB), so each
step gets fresh pages, and every fresh page costs a fault and a zero-fill before the kernel
writes it. With requests up to 32 MiB (glibc's most) served from the heap and 64 MiB of free
heap kept (twice that, as glibc's own adjustment keeps), GPT-2's engine, 64 requests 16 at once
on 2 cores, went from 138-147 to 153-175 output tok/s once warm (benchmarks/engine.py's "16 at
once" workload, in one process). vLLM's CPU backend preloads tcmalloc for the same reason.
"""

from __future__ import annotations

import ctypes
import functools
import sys

# mallopt's parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 * 2**20  # the largest glibc takes on a 64-bit system
TRIM_THRESHOLD = 2 * MMAP_THRESHOLD


@functools.cache
def keep_activations_in_the_heap() -> bool:
    """Set the thresholds above, once per process; whether the C library took them (False
    off Linux, or where it has no ``mallopt``, as musl's does nothing: nothing changes)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library the process runs on
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
