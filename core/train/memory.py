"""Resident memory that follows the live tensors.

glibc's ``malloc`` serves large blocks with ``mmap`` and returns them to the OS when freed, but
it raises that threshold each time such a block is freed, up to 32 MB. A training step frees
and reallocates many activation-sized blocks, so after the first steps most of them come from the
heap instead, and freed heap memory mostly stays resident. On the embedded model that kept about
300 MB of freed memory resident through a DPO step. Fixing the threshold (which turns the
adaptation off) hands every block over 128 KB back as soon as it is freed. The price is speed:
every new block is fresh pages from the kernel, which made a DPO step about 19% slower on a
2-core CPU, so ``trainer.release_freed_memory`` is off by default.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_MMAP_THRESHOLD = -3  # mallopt parameter number in glibc's malloc.h
THRESHOLD = 128 * 1024


def release_freed_memory(threshold: int = THRESHOLD) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes for this process. Returns whether it
    applied (False off Linux or under another C library)."""
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, threshold))
