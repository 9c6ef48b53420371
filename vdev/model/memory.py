"""The memfd behind a BAR's mapped areas, and what memory-disable does to it.

Linux's vfio-pci zaps user mappings of a BAR when memory decoding is turned
off and makes every access to them raise SIGBUS until it is turned on again.
A vfio-user server cannot reach into its client's page tables, but it owns
the file the client mapped: truncating a memfd to zero makes every mapping
of it — the client's included — raise SIGBUS on access, and growing it back
makes the mappings valid again (with the page-table entries gone, so the
next touch faults, as after vfio-pci's zap).

Rules:

* ``revoke`` saves the pages that hold data, found with ``SEEK_DATA`` /
  ``SEEK_HOLE`` so the cost follows the resident pages, not the BAR size;
  then truncates.  ``restore`` grows the file back and writes the saved
  pages.  Pages never touched stay holes.
* ``discard`` truncates without saving: the contents are lost.
* ``populate`` allocates and zeroes every page (``MADV_POPULATE_WRITE`` on
  the device's own mapping) so that all of them are resident in the memfd's
  page cache — what ``mincore`` on any mapping reports — before the client
  may touch them; ``lazy`` leaves holes to be allocated on first touch.
* While revoked, the device's own view (:attr:`MappedMemory.view`) is
  unavailable: touching it would kill the server with SIGBUS.
"""

from __future__ import annotations

import errno
import mmap
import os

PAGE_SIZE = mmap.PAGESIZE
SEEK_DATA = getattr(os, "SEEK_DATA", 3)
SEEK_HOLE = getattr(os, "SEEK_HOLE", 4)
MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)


class MemoryRevokedError(RuntimeError):
    """The BAR's memory is revoked (memory decoding is off); it cannot be touched now."""


class MappedMemory:
    """One memfd of ``size`` bytes and the device's own mapping of it."""

    def __init__(self, name: str, size: int) -> None:
        self.size = size
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC)
        os.ftruncate(self.fd, size)
        self._map = mmap.mmap(self.fd, size)
        self._saved: list[tuple[int, bytes]] = []
        self.revoked = False

    @property
    def view(self) -> mmap.mmap:
        """The device's mapping of the memory (raises while revoked)."""
        if self.revoked:
            raise MemoryRevokedError("BAR memory is revoked while memory decoding is disabled")
        return self._map

    def data_segments(self) -> list[tuple[int, int]]:
        """``(offset, length)`` of every run of allocated pages, via SEEK_DATA/SEEK_HOLE."""
        segments: list[tuple[int, int]] = []
        offset = 0
        while offset < self.size:
            try:
                start = os.lseek(self.fd, offset, SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:
                    break
                raise
            end = min(os.lseek(self.fd, start, SEEK_HOLE), self.size)
            segments.append((start, end - start))
            offset = end
        return segments

    def resident_pages(self) -> int:
        """Pages the memfd holds now (0 while revoked): its data segments, which for a memfd are its pages."""
        if self.revoked:
            return 0
        return sum((length + PAGE_SIZE - 1) // PAGE_SIZE for _, length in self.data_segments())

    def revoke(self, *, keep_contents: bool) -> int:
        """Make every mapping fault; returns the bytes saved for :meth:`restore`."""
        if self.revoked:
            return sum(len(data) for _, data in self._saved)
        self._saved = (
            [(offset, os.pread(self.fd, length, offset)) for offset, length in self.data_segments()]
            if keep_contents
            else []
        )
        self.revoked = True
        os.ftruncate(self.fd, 0)
        return sum(len(data) for _, data in self._saved)

    def restore(self, *, populate: bool) -> None:
        """Make the mappings valid again, with the saved contents; ``populate`` makes every page resident."""
        if self.revoked:
            os.ftruncate(self.fd, self.size)
            for offset, data in self._saved:
                os.pwrite(self.fd, data, offset)
            self._saved = []
            self.revoked = False
        if populate:
            self._map.madvise(MADV_POPULATE_WRITE)

    def close(self) -> None:
        self._map.close()
        os.close(self.fd)
        self.fd = -1
