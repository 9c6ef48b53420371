"""``edu``: QEMU's educational PCI device, behaviour for behaviour, served by vdev.

The reference is QEMU's own ``-device edu`` (``hw/misc/edu.c``, documented
in ``docs/specs/edu.rst``); ``tests/devices/test_edu_differential.py`` runs
the same qtest sequences against both and requires identical answers.

edu's semantics belong to offsets *and* access sizes, and both are declared:
the BAR decodes only 4- and 8-byte accesses, each register says which of
those it takes (:class:`~vdev.AccessSizes`) and that any other access to it
reads all-ones and writes nothing, and the 64-bit DMA registers take a
4-byte write as a whole new value.  Offsets no register claims read
all-ones too.  Background work (the factorial engine, the DMA engine) runs
as Trio tasks owned by the device.
"""

from __future__ import annotations

from typing import Any

import trio
import trio.lowlevel

from vdev import RO, RW, WO, AccessSizes, Bar, Device, DmaError, DmaRefused, Field, Msi, Param, Register

MiB = 1 << 20
ALL_ONES = (1 << 64) - 1

FACT_IRQ = 0x0000_0001
DMA_IRQ = 0x0000_0100
STATUS_COMPUTING = 0x01
STATUS_IRQ_ON_FACT = 0x80
DMA_RUN = 0x1
DMA_TO_RAM = 0x2
DMA_IRQ_ON_DONE = 0x4
DMA_WINDOW = 0x40000
DMA_WINDOW_SIZE = 4096

#: A 32-bit register: 4-byte accesses only; any other reads all-ones and writes nothing.
WORD = AccessSizes(reads=(4,), writes=(4,))
#: A command register: written with 4 bytes, never read (reads all-ones).
COMMAND = AccessSizes(reads=(), writes=(4,))
#: A 64-bit DMA register: 4 or 8 bytes; a 4-byte write replaces all of it.
DMA_WORD = AccessSizes(reads=(4, 8), writes=(4, 8), zero_extend=True)


class Edu(Device):
    """QEMU's educational device: identification, liveness, factorial, interrupts and a DMA engine.

    BAR0: 1 MiB, 32-bit memory.  Offsets below 0x80 take 4-byte accesses
    only; from 0x80 on, 4 or 8 bytes; an 8-byte access below 0x80 reads
    all-ones.  Accesses narrower than 4 bytes never reach QEMU's edu (its
    memory region refuses them and the access reads 0), so the BAR refuses
    them the same way; writes of the wrong size change nothing.

    ======  ==========  ======  ====================================================
    offset  name        access  meaning
    ======  ==========  ======  ====================================================
    0x00    ident       RO      0x010000ed: version 1.0
    0x04    liveness    RW      reads back the bitwise inverse of what was written
    0x08    factorial   RW      write n: n! (32-bit) is computed in the background
    0x20    status      RW      0x01 computing (RO), 0x80 raise IRQ 0x1 when done
    0x24    irq_status  RO      the values that raised the interrupt
    0x60    irq_raise   WO      OR the value into irq_status and interrupt
    0x64    irq_ack     WO      clear the value's bits; INTx drops when none are left
    0x80    dma_src     RW      DMA source address (frozen while a transfer runs)
    0x88    dma_dst     RW      DMA destination address
    0x90    dma_count   RW      bytes to transfer
    0x98    dma_cmd     RW      0x1 start, 0x2 direction (1: to RAM), 0x4 IRQ 0x100 when done
    ======  ==========  ======  ====================================================

    The DMA engine's buffer is the 4 KiB window at bus address 0x40000 as
    seen from the device; bus addresses are masked with ``dma_mask``.  A
    write the engine would not take (a new factorial while one is being
    computed, DMA registers while a transfer runs, a command without the
    start bit) changes nothing: ``factorial`` and ``dma_cmd`` read what the
    engines hold, and the DMA addresses go back to what the running transfer
    latched.  A reset leaves edu's state alone (the registers are sticky):
    QEMU's edu declares no reset handler (its class in ``hw/misc/edu.c``
    sets none, read at QEMU commit 06b40d25).
    """

    vendor_id = 0x1234
    device_id = 0x11E8
    revision = 0x10
    class_code = 0x00FF00
    subsystem_vendor_id = 0x1AF4
    subsystem_id = 0x1100

    dma_mask = Param((1 << 28) - 1, help="bus address mask of the DMA engine (edu's default: 28 bits)")
    dma_delay = Param(0.1, help="seconds a DMA transfer takes before it runs (edu: 100 ms)")

    def __init__(self, name: str | None = None, **params: Any) -> None:
        super().__init__(name, **params)
        self.factorial = 0
        self.dma_cmd = 0
        #: The DMA registers as the running transfer latched them.
        self._latched: dict[str, int] = {}
        self.dma_buffer = bytearray(DMA_WINDOW_SIZE)

    def capabilities(self) -> list[Msi]:
        return [Msi(vectors=1)]

    def read_unclaimed(self, offset: int, size: int) -> int:
        """An offset no register claims reads all-ones, as edu answers any address it does not know."""
        return ALL_ONES & ((1 << (8 * size)) - 1)

    def write_unclaimed(self, offset: int, data: bytes) -> None:
        """... and a write there changes nothing."""

    bar0 = Bar(
        1 * MiB,
        sizes=AccessSizes(reads=(4, 8), writes=(4, 8), fill=0x00),
        read=read_unclaimed,
        write=write_unclaimed,
        registers=[
            Register("ident", 0x00, access=RO, reset=0x010000ED, sizes=WORD),
            Register("liveness", 0x04, access=RW, sticky=True, sizes=WORD),
            Register("factorial", 0x08, access=RW, sticky=True, sizes=WORD),
            Register(
                "status",
                0x20,
                access=RO,
                fields=(Field("computing", 0, 1, RO), Field("irq_on_fact", 7, 1, RW)),
                sticky=True,
                sizes=WORD,
            ),
            Register("irq_status", 0x24, access=RO, sticky=True, sizes=WORD),
            Register("irq_raise", 0x60, access=WO, sticky=True, sizes=COMMAND),
            Register("irq_ack", 0x64, access=WO, sticky=True, sizes=COMMAND),
            Register("dma_src", 0x80, width=8, access=RW, sticky=True, sizes=DMA_WORD),
            Register("dma_dst", 0x88, width=8, access=RW, sticky=True, sizes=DMA_WORD),
            Register("dma_count", 0x90, width=8, access=RW, sticky=True, sizes=DMA_WORD),
            Register("dma_cmd", 0x98, width=8, access=RW, sticky=True, sizes=DMA_WORD),
        ],
    )

    # -- interrupts --------------------------------------------------------------

    @bar0.on_write("irq_raise")
    def raise_irq(self, value: int) -> None:
        self.bar0["irq_status"] |= value
        if self.bar0["irq_status"]:
            if self.irq.msi_enabled:
                self.irq.trigger(0)
            else:
                self.irq.raise_intx()

    @bar0.on_write("irq_ack")
    def lower_irq(self, value: int) -> None:
        self.bar0["irq_status"] &= ~value
        if not self.bar0["irq_status"] and not self.irq.msi_enabled:
            self.irq.lower_intx()

    # -- liveness and factorial ------------------------------------------------------

    @bar0.on_write("liveness")
    def _write_liveness(self, value: int) -> None:
        self.bar0["liveness"] = ~value

    @bar0.on_read("factorial")
    def _read_factorial(self) -> int:
        return self.factorial

    @bar0.on_write("factorial")
    def _write_factorial(self, value: int) -> None:
        if self.bar0["status"] & STATUS_COMPUTING:
            return
        self.factorial = value
        self.bar0["status"] |= STATUS_COMPUTING
        self.start_soon(self._compute_factorial)

    async def _compute_factorial(self) -> None:
        await trio.lowlevel.checkpoint()
        n, result = self.factorial, 1
        while n > 0:
            result = (result * n) & 0xFFFF_FFFF
            n -= 1
        self.factorial = result
        self.bar0["status"] &= ~STATUS_COMPUTING
        if self.bar0["status"] & STATUS_IRQ_ON_FACT:
            self.raise_irq(FACT_IRQ)

    # -- DMA ----------------------------------------------------------------------------

    def _keep_latched(self, register: str) -> None:
        """While a transfer runs its registers are frozen: a write puts back what it latched."""
        if self.dma_cmd & DMA_RUN:
            self.bar0[register] = self._latched[register]

    @bar0.on_write("dma_src")
    def _write_dma_src(self, value: int) -> None:
        self._keep_latched("dma_src")

    @bar0.on_write("dma_dst")
    def _write_dma_dst(self, value: int) -> None:
        self._keep_latched("dma_dst")

    @bar0.on_write("dma_count")
    def _write_dma_count(self, value: int) -> None:
        self._keep_latched("dma_count")

    @bar0.on_read("dma_cmd")
    def _read_dma_cmd(self) -> int:
        return self.dma_cmd

    @bar0.on_write("dma_cmd")
    def _write_dma_cmd(self, value: int) -> None:
        if value & DMA_RUN and not self.dma_cmd & DMA_RUN:
            self.dma_cmd = value
            self._latched = {name: self.bar0[name] for name in ("dma_src", "dma_dst", "dma_count")}
            self.start_soon(self._run_dma)

    async def _run_dma(self) -> None:
        await trio.sleep(self.dma_delay)
        source, destination, count = (self._latched[name] for name in ("dma_src", "dma_dst", "dma_count"))
        to_ram = bool(self.dma_cmd & DMA_TO_RAM)
        window_address = source if to_ram else destination
        start = window_address - DMA_WINDOW
        if not (0 <= start and start + count <= DMA_WINDOW_SIZE):
            direction = "write" if to_ram else "read"
            refused = DmaRefused(
                what="edu DMA outside its buffer", direction=direction, address=window_address, size=count
            )
            self.events.record(refused)
        else:
            try:
                if to_ram:
                    await self.dma.write(destination & self.dma_mask, bytes(self.dma_buffer[start : start + count]))
                else:
                    self.dma_buffer[start : start + count] = await self.dma.read(source & self.dma_mask, count)
            except DmaError:
                pass  # refused (and recorded) by the framework; the engine still completes, as edu's does
        self.dma_cmd &= ~DMA_RUN
        if self.dma_cmd & DMA_IRQ_ON_DONE:
            self.raise_irq(DMA_IRQ)
