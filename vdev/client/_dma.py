"""Client memory the server may DMA into, seen from the test's side."""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass
from typing import Literal

import trio

from vdev.protocol import DmaFlag


@dataclass(frozen=True)
class DmaAccess:
    """One DMA_READ (``"read"``) or DMA_WRITE (``"write"``) message the server sent.

    ``offset`` is relative to the region, so tests need not repeat its iova.
    """

    kind: Literal["read", "write"]
    offset: int
    size: int


class DmaRegion:
    """A window of client memory mapped for DMA at ``iova``.

    The test reads and writes it with ``read``/``write``.  The server reaches
    it either directly (``fd`` is the memfd it was given) or through
    DMA_READ/DMA_WRITE messages, which the client answers from the same
    memory and records in ``accesses`` so a test can see what the device did.
    """

    def __init__(self, iova: int, size: int, flags: DmaFlag, memory: mmap.mmap, fd: int | None) -> None:
        self.iova = iova
        self.size = size
        self.flags = flags
        #: The memfd shared with the server, or ``None`` for private memory.
        self.fd = fd
        #: Every message-based access the server made, oldest first.
        self.accesses: list[DmaAccess] = []
        self._memory = memory
        self._changed = trio.Event()

    def __repr__(self) -> str:
        kind = "memfd" if self.fd is not None else "private"
        return f"<DmaRegion {kind} iova={self.iova:#x} size={self.size:#x}>"

    def read(self, offset: int, count: int) -> bytes:
        """``count`` bytes at ``offset`` into the region."""
        self._check(offset, count)
        return self._memory[offset : offset + count]

    def write(self, offset: int, data: bytes) -> None:
        """Store ``data`` at ``offset`` into the region."""
        self._check(offset, len(data))
        self._memory[offset : offset + len(data)] = data

    async def wait_accesses(self, count: int) -> list[DmaAccess]:
        """Wait until the server has made ``count`` message-based accesses."""
        while len(self.accesses) < count:
            await self._changed.wait()
        return list(self.accesses)

    def covers(self, address: int, count: int) -> bool:
        """Whether [address, address+count) lies inside this region."""
        return self.iova <= address and address + count <= self.iova + self.size

    def serve_read(self, address: int, count: int) -> bytes:
        """Answer the server's DMA_READ from this memory."""
        data = self.read(address - self.iova, count)
        self._record("read", address, count)
        return data

    def serve_write(self, address: int, data: bytes) -> None:
        """Apply the server's DMA_WRITE to this memory."""
        self.write(address - self.iova, data)
        self._record("write", address, len(data))

    def close(self) -> None:
        """Release the memory (and memfd); the region must be unmapped first."""
        self._memory.close()
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def _record(self, kind: Literal["read", "write"], address: int, size: int) -> None:
        self.accesses.append(DmaAccess(kind, address - self.iova, size))
        self._changed.set()
        self._changed = trio.Event()

    def _check(self, offset: int, count: int) -> None:
        if offset < 0 or count < 0 or offset + count > self.size:
            raise ValueError(f"[{offset:#x}, {offset + count:#x}) is outside the {self.size:#x}-byte region")
