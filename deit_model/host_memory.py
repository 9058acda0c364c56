"""Keep the C allocator's freed memory for the next batch instead of handing it back to the kernel.

Why: a forward pass allocates and frees the same activation buffers (megabytes each)
every batch. glibc's malloc returns them to the kernel (``munmap`` for blocks above
its mmap threshold, heap trimming for the rest), and the next pass faults every page
back in, zero-filled. For DeiT-tiny on one CPU thread that was 800 to 2,100 page
faults and 2 to 4 ms of kernel time per image at batch 16, and 4,600 to 6,200 faults
and 9 to 13 ms at batch 64 (docs/architecture.md, "Decisions"). Served from the heap
and never trimmed, the buffers are reused: no faults, and the pass 1.01 to 1.12x as
fast at batch 16, 1.19 to 1.30x at batch 64. The numerics are
untouched; only where the memory comes from changes.

The cost: a process keeps its peak heap resident after the peak instead of shrinking
back. A scoring process's memory is its batches' working set, which it needs again
for the next batch.
"""
from __future__ import annotations

import ctypes
import logging
import os
import sys

logger = logging.getLogger(__name__)

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
TRIM_THRESHOLD = 2**30  # free memory at the heap's top beyond this still goes back to the kernel
# set by the user, these win: glibc reads them at start, and this module leaves them be
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_MAX_", "MALLOC_TOP_PAD_")

_done = False


def keep_freed_memory() -> bool:
    """Make this process's malloc (glibc) reuse freed buffers, not unmap them; True if it does.

    For a process that scores batch after batch (a scoring actor, a decode worker, the
    benchmark's ceiling). No block is memory-mapped of its own (``M_MMAP_MAX`` 0), so
    freeing one never unmaps it, and the heap is trimmed only past 1 GiB free at its top.
    Safe to call more than once. Does nothing off glibc, or where the user set one of
    glibc's ``MALLOC_*_`` variables (:data:`USER_SETTINGS`), which is also how to opt out.
    """
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux") or any(k in os.environ for k in USER_SETTINGS):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success, 0 on a refused value
    _done = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    logger.debug("malloc keeps freed memory: %s", _done)
    return _done
