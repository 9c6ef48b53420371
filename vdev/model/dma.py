"""DMA: the device reading and writing the client's memory.

The client offers memory with DMA_MAP, with an fd (the server can map it and
touch it directly) or without (every access becomes a DMA_READ/DMA_WRITE
message to the client).  Device code does not care which: it calls
:meth:`Dma.read` and :meth:`Dma.write` with a bus address, and the runtime's
:class:`DmaPort` picks the path.

DMA is refused, with :class:`DmaError` and an event in the log, when the
device is not a bus master (COMMAND.MASTER clear), or when the range is not
entirely inside memory the client mapped — never a crash.

A range may span several mappings that follow each other without a gap: a
guest behind an IOMMU in caching mode maps its buffers one 4 KiB page per
DMA_MAP, and a device copying 16 KiB must not care.  Such an access is
split at the mappings' edges, each piece going to the port on its own.
Lookups are by binary search over the mappings' start addresses, since a
guest may hold hundreds of thousands of them.
"""

from __future__ import annotations

import bisect
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import trio

from vdev.model.events import DmaMap, DmaRefused, DmaUnmap, FaultInjected

if TYPE_CHECKING:
    from vdev.model.device import Device


class DmaError(Exception):
    """A DMA access the device may not make (not a bus master, unmapped range, client error)."""


@dataclass(frozen=True)
class DmaMapping:
    """One DMA_MAP from the client; ``mapped`` when the server can touch it directly."""

    iova: int
    size: int
    mapped: bool

    @property
    def end(self) -> int:
        return self.iova + self.size


class DmaPort(Protocol):
    """The runtime side of DMA (libvfio-user's sgl calls)."""

    async def dma_read(self, address: int, size: int) -> bytes: ...

    async def dma_write(self, address: int, data: bytes) -> None: ...


class Dma:
    """One device's view of client memory."""

    def __init__(self, device: Device) -> None:
        self._device = device
        self.mappings: dict[int, DmaMapping] = {}
        self._starts: list[int] = []
        self.port: DmaPort | None = None

    def add(self, mapping: DmaMapping) -> None:
        if mapping.iova not in self.mappings:
            bisect.insort(self._starts, mapping.iova)
        self.mappings[mapping.iova] = mapping
        self._device.events.record(DmaMap(iova=mapping.iova, size=mapping.size, mapped=mapping.mapped))

    def remove(self, iova: int) -> None:
        mapping = self.mappings.pop(iova, None)
        if mapping is not None:
            del self._starts[bisect.bisect_left(self._starts, iova)]
            self._device.events.record(DmaUnmap(iova=mapping.iova, size=mapping.size))

    def find(self, address: int) -> DmaMapping | None:
        """The mapping holding bus address ``address``, or None."""
        index = bisect.bisect_right(self._starts, address) - 1
        if index < 0:
            return None
        mapping = self.mappings[self._starts[index]]
        return mapping if address < mapping.end else None

    def pieces(self, address: int, size: int) -> list[tuple[int, int]] | None:
        """``(address, size)`` pieces of the range, one per mapping it crosses; None if part is unmapped."""
        pieces: list[tuple[int, int]] = []
        end = address + size
        while address < end:
            mapping = self.find(address)
            if mapping is None:
                return None
            length = min(end, mapping.end) - address
            pieces.append((address, length))
            address += length
        return pieces

    def clear(self) -> None:
        """The client went away: its mappings went with it."""
        for iova in list(self.mappings):
            self.remove(iova)

    async def _check(self, address: int, size: int, direction: str) -> tuple[DmaPort, list[tuple[int, int]]]:
        reason = None
        fault = self._device.faults.pick("dma")
        if fault is not None:
            at = {"direction": direction, "address": address, "size": size}
            self._device.events.record(FaultInjected(fault=fault, at=at))
            if fault.action == "delay":
                await trio.sleep(fault.seconds)
            else:
                reason = "an injected fault"
        pieces = self.pieces(address, size)
        if reason is None:
            if not self._device.command.master:
                reason = "bus mastering is disabled (COMMAND.MASTER clear)"
            elif pieces is None:
                reason = "range is not inside memory the client mapped"
            elif self.port is None:
                reason = "no client is connected"
        if reason is not None:
            self._device.events.record(DmaRefused(direction=direction, address=address, size=size))
            raise DmaError(f"{self._device.name}: DMA {direction} of {size} bytes at {address:#x} refused: {reason}")
        assert self.port is not None and pieces is not None
        return self.port, pieces

    async def read(self, address: int, size: int) -> bytes:
        """Read ``size`` bytes of client memory at bus address ``address``."""
        port, pieces = await self._check(address, size, "read")
        if len(pieces) <= 1:
            return await port.dma_read(address, size)
        return b"".join([await port.dma_read(at, length) for at, length in pieces])

    async def write(self, address: int, data: bytes) -> None:
        """Write ``data`` to client memory at bus address ``address``."""
        port, pieces = await self._check(address, len(data), "write")
        view = memoryview(bytes(data))
        for at, length in pieces:
            await port.dma_write(at, bytes(view[at - address : at - address + length]))

    async def read_int(self, address: int, size: int = 4) -> int:
        return int.from_bytes(await self.read(address, size), "little")

    async def write_int(self, address: int, value: int, size: int = 4) -> None:
        await self.write(address, value.to_bytes(size, "little"))

    async def read_struct(self, address: int, layout: struct.Struct) -> tuple[Any, ...]:
        return layout.unpack(await self.read(address, layout.size))

    async def write_struct(self, address: int, layout: struct.Struct, *values: Any) -> None:
        await self.write(address, layout.pack(*values))
