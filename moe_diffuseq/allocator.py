"""CPU allocator tuning: keep large tensors in glibc's heap instead of fresh mmaps.

glibc serves every allocation above its mmap threshold (dynamic, up to 32 MiB) with a
fresh mmap and returns it to the OS on free, and it trims the heap top whenever more than
the trim threshold is free. A training or sampling step frees and re-allocates the same
few-MB activations every time, so each step page-faults them in again (slower, and noisy
from run to run). Raising both thresholds (the documented
``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` knobs, set through ``mallopt``
because the environment is read only at process start) keeps those pages mapped; the cost
is that freed memory stays with the process instead of going back to the OS.

The ``moe-diffuseq`` command and the benchmarks call ``tune_cpu_allocator()``; set
``MOE_DIFFUSEQ_MALLOC_TUNING=0`` to keep glibc's defaults.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

_M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
_M_MMAP_THRESHOLD = -3
_MIB = 1 << 20


def tune_cpu_allocator(mmap_threshold_mb: int = 256, trim_threshold_mb: int = 512) -> bool:
    """Raise glibc's mmap and trim thresholds for this process. Returns whether it did.

    A no-op (False) off glibc (macOS, musl) or with MOE_DIFFUSEQ_MALLOC_TUNING=0.
    """
    if os.environ.get("MOE_DIFFUSEQ_MALLOC_TUNING", "1") == "0":
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success; the mmap threshold is capped at 32 MiB on 64-bit glibc
    # only for the *dynamic* adjustment, an explicit value may be larger.
    return bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold_mb * _MIB)) and bool(
        mallopt(_M_TRIM_THRESHOLD, trim_threshold_mb * _MIB)
    )
