"""Looking at a client's mapping of a BAR the way the memory-enable experiments need.

``resident_pages`` asks the kernel (``mincore``) which pages are in memory;
``first_touch_ns`` times the first access to each page, which is where the
difference between ``lazy`` and ``populate`` shows: a page that is not
resident must be allocated and zeroed on first touch, a resident one costs
only the (minor) fault that fills the page table.
"""

from __future__ import annotations

import ctypes
import mmap
import time

PAGE_SIZE = mmap.PAGESIZE

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_libc.mincore.restype = ctypes.c_int


def mapping_address(mapping: mmap.mmap) -> int:
    """The virtual address of a Python mmap (for mincore and timing probes)."""
    anchor = ctypes.c_char.from_buffer(mapping)
    try:
        return ctypes.addressof(anchor)
    finally:
        del anchor


def resident_pages(mapping: mmap.mmap, length: int | None = None) -> int:
    """How many pages of ``mapping`` are resident, as ``mincore(2)`` reports them."""
    length = len(mapping) if length is None else length
    pages = (length + PAGE_SIZE - 1) // PAGE_SIZE
    vector = (ctypes.c_ubyte * pages)()
    if _libc.mincore(mapping_address(mapping), length, vector) != 0:
        raise OSError(ctypes.get_errno(), "mincore failed")
    return sum(byte & 1 for byte in vector)


__all__ = ["PAGE_SIZE", "first_touch_ns", "resident_pages"]


def first_touch_ns(mapping: mmap.mmap, pages: int | None = None) -> list[int]:
    """Nanoseconds of the first read of each page of ``mapping`` (the first ``pages`` pages).

    Call it right after memory was enabled and before anything else touched
    the mapping; Python's own overhead is included and is the same for every
    page, so compare distributions, not single values.
    """
    count = len(mapping) // PAGE_SIZE if pages is None else pages
    clock = time.perf_counter_ns
    costs = []
    for page in range(count):
        start = clock()
        mapping[page * PAGE_SIZE]
        costs.append(clock() - start)
    return costs
