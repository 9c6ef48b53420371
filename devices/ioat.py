"""``ioat``: one channel of an Intel Crystal Beach DMA engine (QuickData, ioat v3.2/v3.3), ``8086:2021``.

It is enough of the hardware for the two drivers that know it — Linux's
``ioatdma`` and the small ``ioat`` driver of the kernel's vfio selftests
(``tools/testing/selftests/vfio/lib/drivers/ioat``) — and it behaves as the
hardware does for everything it implements: descriptors are fetched from
client memory by DMA, copies are made by DMA, the channel status moves
through the hardware's states, completions are written back, and a
descriptor that asks for an interrupt raises MSI-X vector 0.  What it does
not implement (DCA, XOR/P+Q and the other operations, multiple channels) is
listed at the end.

BAR0: 16 KiB, 64-bit, trapped.  Global registers::

    +------+----------------+-------+------------------------------------------+
    | off  | name           | width | meaning                                  |
    +------+----------------+-------+------------------------------------------+
    | 0x00 | CHANCNT        | 8     | RO 1: one channel                        |
    | 0x01 | XFERCAP        | 8     | RO log2 of the largest copy (``xfercap``)|
    | 0x02 | GENCTRL        | 8     | RW, stored                               |
    | 0x03 | INTRCTRL       | 8     | bit 0 master interrupt enable (RW),      |
    |      |                |       | bit 1 interrupt status (RO: ATTNSTATUS   |
    |      |                |       | non-zero), bit 2 interrupt (RO: status   |
    |      |                |       | and master enable), bit 3 MSI-X vector   |
    |      |                |       | control (RW)                             |
    | 0x04 | ATTNSTATUS     | 32    | RO, bit 0 set by a channel interrupt,    |
    |      |                |       | cleared by reading it                    |
    | 0x08 | CBVER          | 8     | RO ``version``: 0x32 or 0x33             |
    | 0x0C | INTRDELAY      | 16    | RW bits 13:0 (no coalescing: bit 15 is 0)|
    | 0x0E | CS_STATUS      | 16    | RO 0                                     |
    | 0x10 | DMACAPABILITY  | 32    | RO 0: copy only                          |
    +------+----------------+-------+------------------------------------------+

Channel 0 at BAR0+0x80::

    +------+----------------+-------+------------------------------------------+
    | 0x80 | CHANCTRL       | 16    | RW: bit 0 interrupt re-arm (the device   |
    |      |                |       | clears it when it interrupts), bit 2     |
    |      |                |       | error completion, bit 3 abort on any     |
    |      |                |       | error, bit 4 error interrupt             |
    | 0x82 | DMA_COMP       | 16    | RO 0x0002: v2 descriptor compatible      |
    | 0x84 | CHANCMD        | 8     | bit 5 reset (reads 1 until the reset is  |
    |      |                |       | done, then the channel is HALTED),       |
    |      |                |       | bit 4 resume, bit 2 suspend              |
    | 0x86 | DMACOUNT       | 16    | RW: descriptors the channel may process  |
    |      |                |       | since CHAINADDR was written (mod 2^16);  |
    |      |                |       | writing it starts the channel            |
    | 0x88 | CHANSTS        | 64    | RO: bits 63:6 the last completed         |
    |      |                |       | descriptor's address, bits 2:0 the state:|
    |      |                |       | 0 ACTIVE, 1 DONE, 2 SUSPENDED, 3 HALTED  |
    | 0x90 | CHAINADDR      | 64    | RW: the first descriptor (64-byte        |
    |      |                |       | aligned); taken at the next start        |
    | 0x98 | CHANCMP        | 64    | RW: where completions are written back   |
    | 0xA0 | CDAR           | 64    | RO: the descriptor being processed       |
    | 0xA8 | CHANERR        | 32    | RW1C: why the channel halted             |
    | 0xAC | CHANERRMSK     | 32    | RW, stored                               |
    +------+----------------+-------+------------------------------------------+

BAR0+0x2000: MSI-X table (one vector per channel); BAR0+0x3000: PBA.
Config space (PCI Express, 4 KiB) holds two error registers outside any
capability, both RW1C: DMAUNCERRSTS at 0x148 and CHANERR_INT at 0x180.
Nothing in this model sets them (they log internal and uncorrectable
errors, which an emulation has none of); drivers read and clear them.

A descriptor is 64 bytes: ``size`` (u32), ``ctl`` (u32: bit 0 interrupt,
bit 3 completion write, bit 5 null, bits 31:24 the operation, 0 = copy),
``src``, ``dst``, ``next`` (u64 each) and 32 bytes the device ignores.
The channel processes descriptors while its count of processed ones differs
from DMACOUNT, following ``next`` from one to the next; a descriptor whose
``next`` points to itself runs DMACOUNT times, which is how the selftests'
driver asks for many copies.  After each descriptor CHANSTS names it; with
the completion-write bit the channel writes CHANSTS (8 bytes) to CHANCMP;
with the interrupt bit it interrupts if CHANCTRL's re-arm bit is set.

Errors halt the channel (CHANSTS state HALTED) and set a CHANERR bit:
source address (0x1: the copy's source is not readable), destination
address (0x2), next descriptor address (0x4: a descriptor cannot be
fetched), next descriptor alignment (0x8), chain address (0x10: CHAINADDR is
not 64-byte aligned), descriptor control (0x400: an operation other than
copy or null), length (0x800: a copy of 0 bytes or more than XFERCAP
allows) and completion address (0x1000).  A halted channel writes its
status to CHANCMP if CHANCTRL asks for error completions and interrupts if
it asks for error interrupts; it stays halted, ignoring DMACOUNT, until it
is reset.  The DMA refusals behind the address errors are the framework's:
an address the client has not mapped, bus mastering off, or a fault plan's
``dma`` fault.

Interrupts go through MSI-X (vector 0) when the client enabled it, else MSI,
else INTx; INTRCTRL must have master enable or, for MSI-X, vector control
set (the selftests' driver sets only vector control and receives its
interrupts from real hardware).

Not implemented: the v1 and v2 commands START, APPEND and ABORT (ignored),
DCA, operations other than copy and null, CHANERRMSK's masking, interrupt
coalescing, and more than one channel.  Channel reset keeps CHANERR (its
bits are sticky; drivers clear them by writing them back).
"""

from __future__ import annotations

import enum
import struct
from typing import Any

import trio

from vdev import (
    RO,
    RW,
    RW1C,
    Bar,
    Device,
    DmaError,
    Field,
    Msi,
    MsiX,
    Param,
    PciExpress,
    PowerManagement,
    Register,
    Violation,
)
from vdev.model.capabilities import Capability
from vdev.model.device import ResetKind

CHANNEL = 0x80
DESCRIPTOR_SIZE = 64
DESCRIPTOR = struct.Struct("<IIQQQ32x")
#: Largest piece a copy moves at once, so a 1 MiB copy does not hold one 1 MiB bytes object per step.
COPY_CHUNK = 1 << 20

# INTRCTRL
MASTER_INT_EN = 0x01
INT_STATUS = 0x02
INT = 0x04
MSIX_VECTOR_CONTROL = 0x08
# CHANCTRL
INT_REARM = 0x0001
ERR_COMPLETION_EN = 0x0004
ANY_ERR_ABORT_EN = 0x0008
ERR_INT_EN = 0x0010
# CHANCMD
CMD_RESET = 0x20
CMD_RESUME = 0x10
CMD_SUSPEND = 0x04
# descriptor control
CTL_INT_EN = 1 << 0
CTL_COMPL_WRITE = 1 << 3
CTL_NULL = 1 << 5
OP_COPY = 0x00


class State(enum.IntEnum):
    """CHANSTS bits 2:0."""

    ACTIVE = 0
    DONE = 1
    SUSPENDED = 2
    HALTED = 3


class ChanErr(enum.IntFlag):
    """The CHANERR bits this model sets."""

    SRC_ADDR = 0x0001
    DEST_ADDR = 0x0002
    NEXT_ADDR = 0x0004
    NEXT_DESC_ALIGN = 0x0008
    CHAIN_ADDR_VALUE = 0x0010
    CONTROL = 0x0400
    LENGTH = 0x0800
    COMPLETION_ADDR = 0x1000


class ChannelError(Exception):
    """A descriptor failed; the channel halts with ``bit`` in CHANERR."""

    def __init__(self, bit: ChanErr, detail: str) -> None:
        super().__init__(detail)
        self.bit = bit


def _xfercap(text: str) -> int:
    value = int(text, 0)
    if not (value == 0 or 12 <= value <= 32):
        raise ValueError("xfercap is 0 (32 GiB) or a log2 size from 12 (4 KiB) to 32")
    return value


def _version(text: str) -> int:
    value = int(text, 0)
    if value not in (0x32, 0x33):
        raise ValueError("version is 0x32 or 0x33 (ioat v3.2 or v3.3)")
    return value


class Ioat(Device):
    """Intel CBDMA (ioat v3.2/v3.3) DMA engine, one channel: copy descriptors, completion, MSI-X."""

    vendor_id = 0x8086
    device_id = 0x2021
    class_code = 0x088000  # system peripheral, other
    express = True

    xfercap = Param(
        12,
        help="log2 of the largest copy: 12 (4 KiB, the default) to 32, or 0 for 32 GiB",
        parser=_xfercap,
    )
    version = Param(0x33, help="CBVER: 0x32 or 0x33", parser=_version)

    bar0 = Bar(
        16 * 1024,
        kind="mem64",
        registers=[
            Register("chancnt", 0x00, width=1, access=RO, reset=1),
            Register("xfercap", 0x01, width=1, access=RO),
            Register("genctrl", 0x02, width=1, access=RW),
            Register(
                "intrctrl",
                0x03,
                width=1,
                access=RO,
                fields=(Field("master_int_en", 0, 1, RW), Field("msix_vector_control", 3, 1, RW)),
            ),
            Register("attnstatus", 0x04, width=4, access=RO),
            Register("cbver", 0x08, width=1, access=RO),
            Register("intrdelay", 0x0C, width=2, access=RO, fields=(Field("delay", 0, 14, RW),)),
            Register("cs_status", 0x0E, width=2, access=RO),
            Register("dmacapability", 0x10, width=4, access=RO),
            Register("chanctrl", CHANNEL + 0x00, width=2, access=RW),
            Register("dma_comp", CHANNEL + 0x02, width=2, access=RO, reset=0x0002),
            Register("chancmd", CHANNEL + 0x04, width=1, access=RW),
            Register("dmacount", CHANNEL + 0x06, width=2, access=RW),
            Register("chansts", CHANNEL + 0x08, width=8, access=RO),
            Register("chainaddr", CHANNEL + 0x10, width=8, access=RW),
            Register("chancmp", CHANNEL + 0x18, width=8, access=RW),
            Register("cdar", CHANNEL + 0x20, width=8, access=RO),
            Register("chanerr", CHANNEL + 0x28, width=4, access=RW1C, sticky=True),
            Register("chanerrmsk", CHANNEL + 0x2C, width=4, access=RW),
        ],
    )

    def __init__(self, name: str | None = None, **params: Any) -> None:
        super().__init__(name, **params)
        self._reset_channel_state()
        self._engine: trio.CancelScope | None = None
        self._engine_done = trio.Event()
        self._engine_done.set()
        self._resetting = False

    def capabilities(self) -> list[Capability]:
        return [
            PciExpress(flr=False),
            MsiX(vectors=1, table_bar=0, table_offset=0x2000, pba_bar=0, pba_offset=0x3000),
            Msi(vectors=1),
            PowerManagement(),
        ]

    def config_registers(self) -> list[Register]:
        return [
            Register("dmauncerrsts", 0x148, width=4, access=RW1C),
            Register("chanerr_int", 0x180, width=4, access=RW1C),
        ]

    def _reset_channel_state(self) -> None:
        """The channel's own state after a reset: halted, nothing processed, nowhere to start."""
        self.state = State.HALTED
        self.completed = 0
        self.processed = 0
        self.next_descriptor = 0
        self._chain_written = False
        self._suspend_requested = False
        self._attention = 0

    # -- registers whose value the device computes -----------------------------------

    @bar0.on_read("xfercap")
    def read_xfercap(self) -> int:
        return self.xfercap

    @bar0.on_read("cbver")
    def read_cbver(self) -> int:
        return self.version

    @bar0.on_read("intrctrl")
    def read_intrctrl(self) -> int:
        value = self.bar0["intrctrl"] & (MASTER_INT_EN | MSIX_VECTOR_CONTROL)
        if self._attention:
            value |= INT_STATUS
            if value & MASTER_INT_EN:
                value |= INT
        return value

    @bar0.on_read("attnstatus")
    def read_attnstatus(self) -> int:
        value, self._attention = self._attention, 0
        if self.irq.intx_level:
            self.irq.lower_intx()
        return value

    @bar0.on_read("chansts")
    def read_chansts(self) -> int:
        return self.chansts

    @bar0.on_read("chancmd")
    def read_chancmd(self) -> int:
        return CMD_RESET if self._resetting else 0

    @property
    def chansts(self) -> int:
        """CHANSTS: the last completed descriptor's address and the channel state."""
        return (self.completed & ~0x3F) | int(self.state)

    # -- commands ------------------------------------------------------------------------

    @bar0.on_write("chainaddr")
    def write_chainaddr(self, value: int) -> None:
        if self.state is State.ACTIVE:
            self.events.record(
                Violation(what="ioat CHAINADDR written while the channel is active", detail=f"{value:#x}")
            )
            return
        self._chain_written = True

    @bar0.on_write("dmacount")
    def write_dmacount(self, value: int) -> None:
        if self.state is State.HALTED and self.bar0["chanerr"]:
            self.events.record(Violation(what="ioat DMACOUNT written while halted by an error", detail=f"{value:#x}"))
            return
        if self.state is State.ACTIVE or self._resetting:
            return  # an active channel sees the new count before its next descriptor
        if self._chain_written:
            self._chain_written = False
            self.next_descriptor = self.bar0["chainaddr"]
            self.processed = 0
            if self.next_descriptor % DESCRIPTOR_SIZE:
                self._halt(ChanErr.CHAIN_ADDR_VALUE)
                return
        self._start()

    @bar0.on_write("chancmd")
    def write_chancmd(self, value: int) -> None:
        self.bar0["chancmd"] = 0
        if value & CMD_RESET:
            if not self._resetting:
                self._resetting = True
                self.start_soon(self._channel_reset)
            return
        if value & CMD_SUSPEND:
            if self.state is State.ACTIVE:
                self._suspend_requested = True
            elif self.state is State.DONE:
                self.state = State.SUSPENDED
        if value & CMD_RESUME and self.state is State.SUSPENDED:
            self._start()

    def _start(self) -> None:
        """Run descriptors until DMACOUNT is reached (the engine task notices a new count itself)."""
        self.state = State.ACTIVE
        self._suspend_requested = False
        if self._engine is None:
            self._engine = trio.CancelScope()
            self._engine_done = trio.Event()
            self.start_soon(self._run_engine, self._engine)

    async def _channel_reset(self) -> None:
        """CHANCMD reset: stop the engine, clear the channel, then let the reset bit read 0."""
        await self._stop_engine()
        for name in ("chanctrl", "dmacount", "chainaddr", "chancmp", "cdar", "chancmd"):
            self.bar0[name] = 0
        self._reset_channel_state()
        self._resetting = False

    async def _stop_engine(self) -> None:
        if self._engine is not None:
            self._engine.cancel()
        await self._engine_done.wait()

    # -- the engine ----------------------------------------------------------------------

    async def _run_engine(self, scope: trio.CancelScope) -> None:
        try:
            with scope:
                while self.state is State.ACTIVE and not self._resetting:
                    if self._suspend_requested:
                        self._suspend_requested = False
                        self.state = State.SUSPENDED
                    elif self.processed == self.bar0["dmacount"]:
                        self.state = State.DONE
                    else:
                        await self._process_descriptor()
                    # One descriptor at a time: register accesses (status polls, commands) get in between.
                    await trio.lowlevel.checkpoint()
        finally:
            self._engine = None
            self._engine_done.set()

    async def _process_descriptor(self) -> None:
        address = self.next_descriptor
        self.bar0["cdar"] = address
        try:
            if address % DESCRIPTOR_SIZE:
                raise ChannelError(ChanErr.NEXT_DESC_ALIGN, f"descriptor address {address:#x} is not 64-byte aligned")
            try:
                size, ctl, src, dst, following = await self.dma.read_struct(address, DESCRIPTOR)
            except DmaError as exc:
                raise ChannelError(ChanErr.NEXT_ADDR, str(exc)) from exc
            if not ctl & CTL_NULL:
                await self._execute(ctl >> 24, size, src, dst)
        except ChannelError as error:
            self.events.record(Violation(what=f"ioat channel error {error.bit.name}", detail=str(error)))
            self._halt(error.bit)
            return
        self.processed = (self.processed + 1) & 0xFFFF
        self.completed = address
        self.next_descriptor = following
        finished = self.processed == self.bar0["dmacount"] and not self._suspend_requested
        if finished:
            self.state = State.DONE
        if ctl & CTL_COMPL_WRITE:
            status = self.chansts if finished else self.completed & ~0x3F | State.ACTIVE
            try:
                await self.dma.write_int(self.bar0["chancmp"], status, 8)
            except DmaError as exc:
                self.events.record(Violation(what="ioat completion write failed", detail=str(exc)))
                self._halt(ChanErr.COMPLETION_ADDR)
                return
        if ctl & CTL_INT_EN:
            self._interrupt()

    async def _execute(self, operation: int, size: int, src: int, dst: int) -> None:
        if operation != OP_COPY:
            raise ChannelError(ChanErr.CONTROL, f"operation {operation:#x} is not implemented (copy only)")
        limit = 1 << (self.xfercap or 35)
        if not 0 < size <= limit:
            raise ChannelError(ChanErr.LENGTH, f"copy of {size} bytes (XFERCAP allows 1 to {limit})")
        for offset in range(0, size, COPY_CHUNK):
            length = min(COPY_CHUNK, size - offset)
            try:
                data = await self.dma.read(src + offset, length)
            except DmaError as exc:
                raise ChannelError(ChanErr.SRC_ADDR, str(exc)) from exc
            try:
                await self.dma.write(dst + offset, data)
            except DmaError as exc:
                raise ChannelError(ChanErr.DEST_ADDR, str(exc)) from exc

    def _halt(self, bit: ChanErr) -> None:
        """Stop on an error: CHANERR, HALTED, then the error completion and interrupt CHANCTRL asks for."""
        self.bar0["chanerr"] |= int(bit)
        self.state = State.HALTED
        chanctrl = self.bar0["chanctrl"]
        if chanctrl & ERR_COMPLETION_EN:
            self.start_soon(self._error_completion, self.chansts)
        if chanctrl & ERR_INT_EN:
            self._interrupt()

    async def _error_completion(self, status: int) -> None:
        try:
            await self.dma.write_int(self.bar0["chancmp"], status, 8)
        except DmaError:
            return  # nowhere to report it: the channel is already halted with its error

    def _interrupt(self) -> None:
        """A channel interrupt: only while re-armed, which it disarms."""
        chanctrl = self.bar0["chanctrl"]
        if not chanctrl & INT_REARM:
            return
        self.bar0["chanctrl"] = chanctrl & ~INT_REARM
        self._attention |= 1
        intrctrl = self.bar0["intrctrl"]
        mode = self.irq.mode
        if mode == "msix" and intrctrl & (MASTER_INT_EN | MSIX_VECTOR_CONTROL):
            self.irq.trigger(0)
        elif mode == "msi" and intrctrl & MASTER_INT_EN:
            self.irq.trigger(0)
        elif mode == "intx" and intrctrl & MASTER_INT_EN:
            self.irq.raise_intx()

    # -- device-level resets and quiescing ---------------------------------------------------

    async def on_reset(self, kind: ResetKind) -> None:
        """A device reset or FLR stops the engine and returns the channel to its power-on state."""
        if kind is ResetKind.LOST_CONNECTION:
            return
        await self._stop_engine()
        self._reset_channel_state()
        self._resetting = False
