"""``edu``: QEMU's educational PCI device, behaviour for behaviour, served by vdev.

The reference is QEMU's own ``-device edu`` (``hw/misc/edu.c``, documented
in ``docs/specs/edu.rst``); ``tests/devices/test_edu_differential.py`` runs
the same qtest sequences against both and requires identical answers.

edu's semantics belong to offsets *and* access sizes — a 4-byte write to an
8-byte DMA register replaces all of it, accesses of the wrong size read as
all-ones — so it uses the BAR's raw read/write escape hatch with a table of
per-offset handlers rather than byte-merging registers.  Background work
(the factorial engine, the DMA engine) runs as Trio tasks owned by the device.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import trio
import trio.lowlevel

from vdev import Bar, Device, DmaError, DmaRefused, Msi, Param

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


class Edu(Device):
    """QEMU's educational device: identification, liveness, factorial, interrupts and a DMA engine.

    BAR0: 1 MiB, 32-bit memory.  Offsets below 0x80 take 4-byte accesses
    only; from 0x80 on, 4 or 8 bytes; an 8-byte access below 0x80 reads
    all-ones.  Accesses narrower than 4 bytes never reach QEMU's edu (its
    memory region refuses them and the access reads 0), so they read 0 here
    too; writes of the wrong size change nothing.

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
    seen from the device; bus addresses are masked with ``dma_mask``.
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
        self.liveness = 0
        self.factorial = 0
        self.status = 0
        self.irq_status = 0
        self.dma_src = self.dma_dst = self.dma_count = self.dma_cmd = 0
        self.dma_buffer = bytearray(DMA_WINDOW_SIZE)
        self._readers: dict[int, Callable[[], int]] = {
            0x00: lambda: 0x010000ED,
            0x04: lambda: self.liveness,
            0x08: lambda: self.factorial,
            0x20: lambda: self.status,
            0x24: lambda: self.irq_status,
            0x80: lambda: self.dma_src,
            0x88: lambda: self.dma_dst,
            0x90: lambda: self.dma_count,
            0x98: lambda: self.dma_cmd,
        }
        self._writers: dict[int, Callable[[int], None]] = {
            0x04: self._write_liveness,
            0x08: self._write_factorial,
            0x20: self._write_status,
            0x60: self.raise_irq,
            0x64: self.lower_irq,
            0x80: lambda value: self._write_dma("dma_src", value),
            0x88: lambda value: self._write_dma("dma_dst", value),
            0x90: lambda value: self._write_dma("dma_count", value),
            0x98: self._write_dma_cmd,
        }

    def capabilities(self) -> list[Msi]:
        return [Msi(vectors=1)]

    @staticmethod
    def _size_ok(offset: int, size: int) -> bool:
        return size == 4 if offset < 0x80 else size in (4, 8)

    def read_bar0(self, offset: int, size: int) -> int:
        if size < 4:
            return 0
        if not self._size_ok(offset, size):
            return ALL_ONES & ((1 << (8 * size)) - 1)
        reader = self._readers.get(offset)
        return (reader() if reader else ALL_ONES) & ((1 << (8 * size)) - 1)

    def write_bar0(self, offset: int, data: bytes) -> None:
        writer = self._writers.get(offset)
        if writer is not None and self._size_ok(offset, len(data)):
            writer(int.from_bytes(data, "little"))

    bar0 = Bar(1 * MiB, read=read_bar0, write=write_bar0)

    # -- interrupts --------------------------------------------------------------

    def raise_irq(self, value: int) -> None:
        self.irq_status = (self.irq_status | value) & 0xFFFF_FFFF
        if self.irq_status:
            if self.irq.msi_enabled:
                self.irq.trigger(0)
            else:
                self.irq.raise_intx()

    def lower_irq(self, value: int) -> None:
        self.irq_status &= ~value & 0xFFFF_FFFF
        if not self.irq_status and not self.irq.msi_enabled:
            self.irq.lower_intx()

    # -- liveness and factorial ------------------------------------------------------

    def _write_liveness(self, value: int) -> None:
        self.liveness = ~value & 0xFFFF_FFFF

    def _write_status(self, value: int) -> None:
        if value & STATUS_IRQ_ON_FACT:
            self.status |= STATUS_IRQ_ON_FACT
        else:
            self.status &= ~STATUS_IRQ_ON_FACT

    def _write_factorial(self, value: int) -> None:
        if self.status & STATUS_COMPUTING:
            return
        self.factorial = value & 0xFFFF_FFFF
        self.status |= STATUS_COMPUTING
        self.start_soon(self._compute_factorial)

    async def _compute_factorial(self) -> None:
        await trio.lowlevel.checkpoint()
        n, result = self.factorial, 1
        while n > 0:
            result = (result * n) & 0xFFFF_FFFF
            n -= 1
        self.factorial = result
        self.status &= ~STATUS_COMPUTING
        if self.status & STATUS_IRQ_ON_FACT:
            self.raise_irq(FACT_IRQ)

    # -- DMA ----------------------------------------------------------------------------

    def _write_dma(self, register: str, value: int) -> None:
        if not self.dma_cmd & DMA_RUN:
            setattr(self, register, value)

    def _write_dma_cmd(self, value: int) -> None:
        if value & DMA_RUN and not self.dma_cmd & DMA_RUN:
            self.dma_cmd = value
            self.start_soon(self._run_dma)

    async def _run_dma(self) -> None:
        await trio.sleep(float(self.dma_delay))
        count = self.dma_count
        to_ram = bool(self.dma_cmd & DMA_TO_RAM)
        window_address = self.dma_src if to_ram else self.dma_dst
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
                    await self.dma.write(self.dma_dst & self.dma_mask, bytes(self.dma_buffer[start : start + count]))
                else:
                    self.dma_buffer[start : start + count] = await self.dma.read(self.dma_src & self.dma_mask, count)
            except DmaError:
                pass  # refused (and recorded) by the framework; the engine still completes, as edu's does
        self.dma_cmd &= ~DMA_RUN
        if self.dma_cmd & DMA_IRQ_ON_DONE:
            self.raise_irq(DMA_IRQ)
