"""The test bench: a device driven in this process, with no socket and no libvfio-user.

A :class:`Bench` plays the client and the runtime at once.  It reaches the
device through the entry points the runtime uses when a real client talks to
it — :meth:`Device.region_read`, :meth:`Device.region_write`,
:meth:`Device.reset`, the interrupt model's SET_IRQS entry points, the
:class:`~vdev.model.dma.DmaPort` and :class:`~vdev.model.interrupts.IrqSink`
protocols — so what passes on the bench is what the device does when served,
minus the transport:

* config space, BARs (by register name or by offset), COMMAND's enable bits;
* a :class:`RecordingSink` that records which vectors of which type fired,
  in order, and plays the client's eventfds and SET_IRQS masks;
* :class:`ClientMemory`, bytearrays standing for what a client offers with
  DMA_MAP, so devices that DMA (``edu``) run in-process;
* reset, with the quiesce libvfio-user asks for first.

Everything is async, because device handlers may be: run bench tests under
pytest-trio.  The bench has no threads, so the device's background tasks run
on the test's own Trio loop: :func:`trio.testing.wait_all_tasks_blocked`
means "the device has nothing left to do", and pytest-trio's
``autojump_clock`` makes a device's ``trio.sleep`` take no real time.

Where the bench differs from a served device, it is to tell the test more:
an exception in a handler reaches the test (a client would get EIO), and so
does one in the device's :meth:`~vdev.Device.run` (a server logs it and keeps
serving).  Background work started with :meth:`~vdev.Device.start_soon`
fails as it does when served: logged, and recorded as a ``handler_error``
event.

    >>> import trio
    >>> from vdev.protocol.constants import IrqIndex
    >>> from vdev.testing import Fired, open_bench
    >>> from vdev_devices.hello import Hello
    >>> async def main():
    ...     async with open_bench(Hello()) as bench:
    ...         await bench.enable(memory=True, io=False, master=True)
    ...         await bench.enable_msi()
    ...         await bench.write(0, "doorbell", 1)
    ...         return hex(await bench.read(0, "id")), bench.irqs.take()
    >>> trio.run(main)
    ('0x48454c4f', [Fired(irq_type=<IrqIndex.MSI: 1>, vector=0)])
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

import trio

from vdev.model.bars import BarState
from vdev.model.capabilities import Msi, MsiX
from vdev.model.device import Device, ResetKind
from vdev.model.dma import DmaError, DmaMapping
from vdev.model.pci_regs import PCI_COMMAND, PCI_COMMAND_IO, PCI_COMMAND_MASTER, PCI_COMMAND_MEMORY
from vdev.model.registers import call_hook
from vdev.protocol.constants import IrqIndex, RegionIndex

__all__ = ["Bench", "ClientMemory", "DmaTransfer", "Fired", "RecordingSink", "open_bench"]

D = TypeVar("D", bound=Device)


@dataclass(frozen=True)
class Fired:
    """One interrupt that reached the client: its type and vector (subindex)."""

    irq_type: IrqIndex
    vector: int = 0


class RecordingSink:
    """The client's side of interrupts on the bench: eventfds, and what fired through them.

    Like a real client, it has an eventfd for some vectors (``wired``):
    a signal to one is recorded in :attr:`fired`; a signal to an MSI-X
    vector without one is handed back to the model, which holds the vector
    pending until :meth:`Bench.set_irqs` installs one — what the runtime does
    when libvfio-user finds no eventfd.  INTx and MSI signals without an
    eventfd are lost (kept in :attr:`lost`, for diagnosis).
    """

    def __init__(self, device: Device) -> None:
        self._device = device
        #: Interrupts delivered, oldest first.
        self.fired: list[Fired] = []
        #: INTx, MSI, ERR and REQ signals that found no eventfd.
        self.lost: list[Fired] = []
        #: The vectors of each type the client has an eventfd for.
        self.wired: dict[IrqIndex, set[int]] = {irq_type: set() for irq_type in IrqIndex}
        self._arrived = trio.Event()

    def fire(self, irq_type: IrqIndex, vector: int) -> None:
        """:class:`~vdev.model.interrupts.IrqSink`: signal the client's eventfd for ``vector``."""
        if vector in self.wired[irq_type]:
            self.fired.append(Fired(irq_type, vector))
            self._arrived.set()
            self._arrived = trio.Event()
        elif irq_type is IrqIndex.MSIX:
            self._device.irq.no_eventfd(irq_type, vector)
        else:
            self.lost.append(Fired(irq_type, vector))

    def take(self) -> list[Fired]:
        """What fired since the last ``take`` (or since the bench opened), oldest first; forgets it."""
        taken, self.fired = self.fired, []
        return taken

    def vectors(self, irq_type: IrqIndex) -> list[int]:
        """The vectors of ``irq_type`` that fired (and were not taken yet), in order."""
        return [fired.vector for fired in self.fired if fired.irq_type is irq_type]

    async def wait(self, irq_type: IrqIndex | None = None, vector: int | None = None, *, count: int = 1) -> Fired:
        """Sleep until ``count`` matching interrupts are recorded (and not taken); return the last.

        ``None`` matches any type or vector.  Wrap it in :func:`trio.fail_after`
        for a deadline.
        """
        while True:
            matching = [
                fired
                for fired in self.fired
                if (irq_type is None or fired.irq_type is irq_type) and (vector is None or fired.vector == vector)
            ]
            if len(matching) >= count:
                return matching[count - 1]
            await self._arrived.wait()


@dataclass(frozen=True)
class DmaTransfer:
    """One DMA the device made through :class:`ClientMemory`."""

    direction: Literal["read", "write"]
    address: int
    size: int


class ClientMemory:
    """Memory a client offered with DMA_MAP, as bytearrays: the bench's :class:`~vdev.model.dma.DmaPort`.

    The device's :class:`~vdev.model.dma.Dma` has already refused what
    hardware would refuse (bus mastering off, unmapped ranges) before a
    transfer gets here; every one that does is recorded in :attr:`transfers`.
    """

    def __init__(self) -> None:
        #: ``{iova: bytes}`` for each mapping.
        self.regions: dict[int, bytearray] = {}
        #: The DMAs the device made, oldest first.
        self.transfers: list[DmaTransfer] = []

    def _locate(self, address: int, size: int) -> tuple[bytearray, int]:
        for iova, memory in self.regions.items():
            if iova <= address and address + size <= iova + len(memory):
                return memory, address - iova
        raise DmaError(f"{address:#x}+{size:#x} is not inside one mapping of the bench's client memory")

    async def dma_read(self, address: int, size: int) -> bytes:
        memory, at = self._locate(address, size)
        self.transfers.append(DmaTransfer("read", address, size))
        return bytes(memory[at : at + size])

    async def dma_write(self, address: int, data: bytes) -> None:
        memory, at = self._locate(address, len(data))
        self.transfers.append(DmaTransfer("write", address, len(data)))
        memory[at : at + len(data)] = data


class Bench(Generic[D]):
    """One device on the bench; made by :func:`open_bench` (or the ``vdev_bench`` fixture).

    Methods that reach the device are ``async`` (its handlers may be); the
    SET_IRQS ones only change interrupt state and are plain.  The bench is
    generic in the device's class, so ``bench.device`` has your device's type.
    """

    def __init__(self, device: D) -> None:
        #: The device under test; its state may be inspected at any time.
        self.device = device
        device.events.keep_accesses = True  # tests read the accesses from the log afterwards
        #: The client's eventfds and every interrupt that reached them.
        self.irqs = RecordingSink(device)
        #: Memory the client offered with :meth:`dma_map`.
        self.memory = ClientMemory()

    # -- config space -----------------------------------------------------------

    async def config_read(self, offset: int, size: int = 4) -> int:
        """Read ``size`` bytes of config space at ``offset`` as a little-endian integer."""
        return int.from_bytes(await self.device.region_read(RegionIndex.CONFIG, offset, size), "little")

    async def config_write(self, offset: int, value: int, size: int = 4) -> None:
        """Write ``value`` as ``size`` little-endian bytes of config space, as a client would."""
        await self.device.region_write(RegionIndex.CONFIG, offset, value.to_bytes(size, "little"))

    async def enable(self, *, memory: bool = True, io: bool = True, master: bool = True) -> None:
        """Set COMMAND's memory, I/O and bus-master bits to exactly these values; other bits stay.

        A BAR answers only while its decoding is on (otherwise its
        ``when_disabled`` policy applies), and DMA and MSIs need ``master``.
        """
        command = await self.config_read(PCI_COMMAND, 2)
        for bit, wanted in ((PCI_COMMAND_IO, io), (PCI_COMMAND_MEMORY, memory), (PCI_COMMAND_MASTER, master)):
            command = command | bit if wanted else command & ~bit
        await self.config_write(PCI_COMMAND, command, 2)

    # -- BARs ---------------------------------------------------------------------

    def _locate(self, bar: int, register: str | int, size: int | None) -> tuple[int, int]:
        try:
            state: BarState = self.device.bar(bar)
        except KeyError:
            raise ValueError(f"{self.device.name} has no BAR{bar}") from None
        if isinstance(register, int):
            return register, 4 if size is None else size
        found = state.registers.by_name.get(register)
        if found is None:
            known = ", ".join(state.registers.by_name) or "none"
            raise KeyError(f"BAR{bar} of {self.device.name} has no register {register!r} (registers: {known})")
        return found.offset, found.width if size is None else size

    async def read(self, bar: int, register: str | int, size: int | None = None) -> int:
        """Read a register of BAR ``bar`` by name (its whole width) or by offset (4 bytes).

        ``size`` overrides the width, for partial or wider accesses.  The
        access goes through the device exactly as a client's REGION_READ
        does: decoding, mapped areas, MSI-X table and PBA, hooks.
        """
        offset, width = self._locate(bar, register, size)
        return int.from_bytes(await self.device.region_read(bar, offset, width), "little")

    async def write(self, bar: int, register: str | int, value: int, size: int | None = None) -> None:
        """Write a register of BAR ``bar`` by name or offset, as :meth:`read` addresses it.

        Returns when the device's handlers have finished with it.
        """
        offset, width = self._locate(bar, register, size)
        await self.device.region_write(bar, offset, value.to_bytes(width, "little"))

    # -- interrupts ------------------------------------------------------------------

    async def enable_msi(self, vectors: int = 1) -> None:
        """Enable MSI with ``vectors`` vectors allocated (a power of two), as a driver does."""
        placed = self.device.config.find(Msi)
        if placed is None:
            raise ValueError(f"{self.device.name} has no MSI capability")
        if vectors not in (1, 2, 4, 8, 16, 32):
            raise ValueError("MSI allocates 1, 2, 4, 8, 16 or 32 vectors")
        register = placed.register("message_control")
        control = await self.config_read(register.offset, register.width)
        control = register.field("multiple_message_enable").insert(control, vectors.bit_length() - 1)
        control = register.field("enable").insert(control, 1)
        await self.config_write(register.offset, control, register.width)

    async def enable_msix(self, *, function_masked: bool = False) -> None:
        """Enable MSI-X, with the function mask set or clear."""
        placed = self.device.config.find(MsiX)
        if placed is None:
            raise ValueError(f"{self.device.name} has no MSI-X capability")
        register = placed.register("message_control")
        control = await self.config_read(register.offset, register.width)
        control = register.field("enable").insert(control, 1)
        control = register.field("function_mask").insert(control, int(function_masked))
        await self.config_write(register.offset, control, register.width)

    def set_irqs(self, irq_type: IrqIndex, start: int = 0, count: int = 1) -> None:
        """SET_IRQS with eventfds: the client can now be signalled on ``[start, start + count)``.

        MSI-X vectors held pending for want of an eventfd fire now, as they
        do after a real client's SET_IRQS.
        """
        self.irqs.wired[irq_type] |= set(range(start, start + count))
        self.device.irq.eventfds_changed()

    def disable_irqs(self, irq_type: IrqIndex, start: int = 0, count: int | None = None) -> None:
        """SET_IRQS without eventfds: drop them for ``[start, start + count)`` (all when ``count`` is None)."""
        if count is None:
            self.irqs.wired[irq_type].clear()
        else:
            self.irqs.wired[irq_type] -= set(range(start, start + count))

    def mask_irqs(self, irq_type: IrqIndex, start: int = 0, count: int = 1) -> None:
        """SET_IRQS ACTION_MASK: the client masks vectors; the device holds them pending."""
        self.device.irq.client_mask(irq_type, start, count, True)

    def unmask_irqs(self, irq_type: IrqIndex, start: int = 0, count: int = 1) -> None:
        """SET_IRQS ACTION_UNMASK: pending vectors that are no longer masked fire."""
        self.device.irq.client_mask(irq_type, start, count, False)

    # -- DMA and reset -----------------------------------------------------------------

    async def dma_map(self, iova: int, size: int, *, mapped: bool = True) -> bytearray:
        """Offer ``size`` bytes of zeroed memory at bus address ``iova``; returns them.

        The device is quiesced first, as libvfio-user does before a DMA_MAP.
        ``mapped`` says whether a server could map the memory directly (the
        client sent an fd); the bench moves the bytes either way.
        """
        if size <= 0:
            raise ValueError("a DMA mapping needs at least one byte")
        if any(iova < start + len(memory) and start < iova + size for start, memory in self.memory.regions.items()):
            raise ValueError(f"{iova:#x}+{size:#x} overlaps an existing mapping")
        await call_hook(self.device.on_quiesce)
        memory = bytearray(size)
        self.memory.regions[iova] = memory
        self.device.dma.add(DmaMapping(iova, size, mapped))
        return memory

    async def dma_unmap(self, iova: int) -> None:
        """Withdraw the mapping at ``iova`` (quiescing the device first)."""
        if iova not in self.memory.regions:
            raise ValueError(f"nothing is mapped at {iova:#x}")
        await call_hook(self.device.on_quiesce)
        self.device.dma.remove(iova)
        del self.memory.regions[iova]

    async def reset(self, kind: ResetKind = ResetKind.DEVICE) -> None:
        """Reset the device for ``kind`` (quiescing it first, as libvfio-user does)."""
        await call_hook(self.device.on_quiesce)
        await self.device.reset(kind)


@asynccontextmanager
async def open_bench(device: D, *, wired: bool = True) -> AsyncIterator[Bench[D]]:
    """Put ``device`` on the bench for the ``async with`` block, attached as to a client.

    The device's :meth:`~vdev.Device.run` and the tasks it starts run in the
    block's nursery.  With ``wired`` (the default) the client has an eventfd
    for every interrupt the device has, like a driver that wired them all;
    with ``wired=False`` it has none until :meth:`Bench.set_irqs`.
    On exit the client detaches, as after a disconnect, and the device's
    tasks are cancelled.
    """
    bench = Bench(device)
    async with trio.open_nursery() as nursery:
        device.attach_nursery(nursery)
        nursery.start_soon(device.run)
        device.attach_client(bench.irqs, bench.memory)
        try:
            if wired:
                for irq_type, count in device.irq.vector_counts().items():
                    bench.irqs.wired[irq_type] = set(range(count))
                device.irq.eventfds_changed()
            yield bench
        finally:
            device.detach_client()
            device.attach_nursery(None)
            nursery.cancel_scope.cancel()
