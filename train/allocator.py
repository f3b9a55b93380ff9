"""Keep freed memory in the process when the model trains on the CPU (glibc malloc settings).

A training step on the CPU allocates and frees the same large activations every step (tens of MB
each). glibc's malloc serves allocations over its mmap threshold with fresh `mmap`s and gives freed
memory at the top of the heap back to the kernel, so the next step touches new pages and each 4 KiB
page costs a page fault and a zeroing. On the 2-core EPYC VM a `ref_small` step (batch 128) took
about 65,000 minor faults; with the settings below about 200, and the step went from 870 to 785 ms
and from 914 to 838 ms in two pairs of runs (2026-11-26). The reference implementation's step gained
about 3% in one pair; with both in one process (`lmim bench model --reference`) the ratio stayed
within its noise (1.12-1.17x after, a median of 1.14x before).

Settings (`mallopt`): allocations up to 32 MiB (glibc's largest mmap threshold) come from the heap,
and the heap is trimmed only past 1 GiB of free memory at its top, so a process holds about its
peak working set instead of returning it between steps. Larger allocations still use mmap.

Applied only when the model runs on the CPU (GPU hosts allocate little per step) and only under
glibc; `LMIM_MALLOC_TUNE=0` turns it off.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

__all__ = ["keep_freed_memory", "MMAP_THRESHOLD", "TRIM_THRESHOLD"]

# mallopt parameter numbers (glibc malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 32 << 20  # glibc's maximum on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = 1 << 30

_applied: str | None = None


def keep_freed_memory() -> str:
    """Tune glibc malloc (module docstring) once per process; returns one line saying what was done."""
    global _applied
    if _applied is not None:
        return _applied
    if os.environ.get("LMIM_MALLOC_TUNE", "1") == "0":
        _applied = "allocator: glibc defaults (LMIM_MALLOC_TUNE=0)"
        return _applied
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        _applied = "allocator: left as is (not glibc)"
        return _applied
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    except (OSError, AttributeError):  # pragma: no cover - a libc without mallopt
        ok = False
    _applied = ("allocator: glibc malloc keeps freed memory for reuse (mmap threshold 32 MiB, trim past 1 GiB)"
                if ok else "allocator: left as is (mallopt refused the settings)")
    return _applied
