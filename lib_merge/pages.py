"""Page-level memory advice (Linux ``madvise``) on the memory behind tensors.

Called through ctypes, which releases the GIL for the call: populating gigabytes of pages takes seconds on a VM,
and Python's own ``mmap.madvise`` would hold the GIL (and so stall every other Python thread) meanwhile.
Every function is best effort: where the kernel or platform lacks the advice it does nothing and returns False.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import sys

import torch

DONTNEED = 4
HUGEPAGE = 14
POPULATE_READ = 22  # Linux 5.14+: fault the pages in now (read), one call instead of a fault per page
PAGE = mmap.PAGESIZE


def _libc_madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_MADVISE = _libc_madvise()


def advise_range(addr: int, length: int, advice: int) -> bool:
    """madvise over the pages covering [addr, addr + length). Never use advice that discards the contents of
    anonymous memory here: the edge pages may hold a neighbour's bytes."""
    if _MADVISE is None or length <= 0:
        return False
    start = addr // PAGE * PAGE
    end = -(-(addr + length) // PAGE) * PAGE
    return _MADVISE(start, end - start, advice) == 0


def advise(t: torch.Tensor, advice: int) -> bool:
    """madvise over the memory of a contiguous CPU tensor."""
    if t.device.type != "cpu" or not t.is_contiguous():
        return False
    return advise_range(t.data_ptr(), t.numel() * t.element_size(), advice)


def _libc_malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim  # glibc only
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


_MALLOC_TRIM = _libc_malloc_trim()


def trim_heap() -> bool:
    """Give the malloc heap's free pages back to the system (glibc ``malloc_trim(0)``). Freed tensors below
    glibc's mmap threshold live in the heap, whose free pages otherwise stay in the process's anonymous memory.
    True when some memory was released; False where there is no glibc."""
    if _MALLOC_TRIM is None:
        return False
    return _MALLOC_TRIM(0) == 1
