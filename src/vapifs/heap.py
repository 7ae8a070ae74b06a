"""The allocator's handling of block-sized buffers: freed ones are kept for the next block.

A block is 1 MiB, past glibc's limits for its heap: by default every block read from the
disk cache or received from the network maps fresh pages (which the kernel zeroes, one page
fault each) and unmaps them when the block is dropped, which costs more than reading the
block from the page cache. With these settings a freed block's memory is reused by the next
one. Peak memory is the same: only memory already used is kept. Elsewhere than on glibc this
does nothing.
"""

from __future__ import annotations

import ctypes
import sys

# mallopt(3) parameters.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Buffers below this come from the heap (a block, sealed or not, is well below it).
MMAP_THRESHOLD = 4 << 20
# Free memory kept at the top of a heap before it goes back to the kernel: the blocks a
# memory cache of the default size turns over.
TRIM_THRESHOLD = 64 << 20

_done = False


def keep_freed_blocks() -> bool:
    """Make freed block buffers reusable without new pages; True where that took effect."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    _done = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
    return _done
