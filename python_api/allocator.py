"""Keep freed memory in the process (glibc): training allocates and frees the same large
buffers every step, and glibc's defaults hand blocks of more than 128 KiB back to the kernel
at once, so every step page-faults them in again (zero-filled). On this project's 2-core VM the
cpu-scale Tables 3-4 cells spent half their CPU time in the kernel before (vmstat: 50% sys) and
none after; a single-process timing varies with the VM's own memory management (6-9 s per 40
steps either way). No effect off glibc."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["keep_freed_memory"]

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_MMAP_THRESHOLD_MAX = 32 << 20   # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit systems
_done = False


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process (once). Returns whether the
    allocator accepted them (False off glibc, e.g. macOS or musl)."""
    global _done
    if _done or not sys.platform.startswith("linux"):
        return _done
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    _done = all(mallopt(param, value) == 1 for param, value in (
        (_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX), (_M_TRIM_THRESHOLD, 1 << 30), (_M_TOP_PAD, 64 << 20)))
    return _done
