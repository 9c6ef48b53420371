"""Looking at a client's mapping of a BAR the way the memory-enable experiments need.

``resident_pages`` asks the kernel (``mincore``) which pages are in memory;
``first_touch_ns`` times the first access to each page, which is where the
difference between ``lazy`` and ``populate`` shows: a page that is not
resident must be allocated and zeroed on first touch, a resident one costs
only the (minor) fault that fills the page table.
"""

from __future__ import annotations

import mmap
import time

from vdev.model.memory import resident_pages

PAGE_SIZE = mmap.PAGESIZE

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
