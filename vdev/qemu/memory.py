"""Handing out guest RAM to a test.

A qtest machine runs no guest, so its RAM belongs to the test: DMA buffers
for a device, MSI mailboxes.  A bump allocator is all that needs: a machine
lives for one test, and handing out fresh ranges keeps one buffer's leftovers
from looking like another's data.
"""

from __future__ import annotations

from vdev.qemu.errors import QemuError

#: Where allocation starts: above the legacy VGA and BIOS ranges below 1 MiB.
GUEST_RAM_START = 0x10_0000


class GuestMemoryAllocator:
    """Allocates guest-physical ranges from ``[start, end)``; nothing is freed."""

    def __init__(self, start: int, end: int) -> None:
        if not 0 <= start <= end:
            raise ValueError(f"bad guest RAM range [{start:#x}, {end:#x})")
        self._next = start
        self._end = end

    def alloc(self, size: int, *, align: int = 64) -> int:
        """The address of ``size`` fresh bytes, aligned to ``align`` (a power of two)."""
        if size <= 0:
            raise ValueError(f"size must be positive, not {size}")
        if align <= 0 or align & (align - 1):
            raise ValueError(f"alignment must be a power of two, not {align}")
        address = (self._next + align - 1) & ~(align - 1)
        if address + size > self._end:
            raise QemuError(f"guest RAM exhausted: {size:#x} bytes do not fit below {self._end:#x}")
        self._next = address + size
        return address
