"""PCI enumeration, BAR programming and BAR access over qtest.

Under qtest no firmware runs, so nothing has sized or placed a BAR, enabled
decoding or turned on q35's ECAM window: a test does what SeaBIOS or a guest
kernel would.  These helpers do it the way firmware does:

* configuration space through ports ``0xcf8``/``0xcfc`` by default, or any
  other :class:`~vdev.qemu.pci_config.ConfigAccess` (q35's ECAM);
* BAR sizing by writing all-ones with decoding off, then restoring;
* BAR placement inside the machine's PCI windows, aligned to the BAR size and
  never below a page, so that a BAR can back an mmap'able vfio-user region.

Configuration header offsets used here (type 0 unless noted)::

    0x00  vendor id (16) | device id (16)
    0x04  command (16)   | status (16)      command: 0 I/O, 1 memory, 2 bus master
    0x08  revision (8)   | class code (24)
    0x0e  header type (8)                   bit 7: multi-function; low bits 0/1
    0x10  BARs, 6 on type 0, 2 on type 1 (bridges)
    0x34  capabilities pointer (8)          valid when status bit 4 is set
    0x3d  interrupt pin (8)                 1 = INTA ... 4 = INTD
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from vdev.qemu.errors import PciError
from vdev.qemu.pci_config import (
    Q35_ECAM_BASE,
    Q35_ECAM_SIZE,
    ConfigAccess,
    PciAddress,
    PortConfigAccess,
)
from vdev.qemu.qmp import QmpClient
from vdev.qemu.qtest import QTestClient

VENDOR_ID = 0x00
COMMAND = 0x04
STATUS = 0x06
CLASS_REVISION = 0x08
HEADER_TYPE = 0x0E
BAR0 = 0x10
CAPABILITIES_POINTER = 0x34
INTERRUPT_PIN = 0x3D

COMMAND_IO = 1 << 0
COMMAND_MEMORY = 1 << 1
COMMAND_MASTER = 1 << 2
STATUS_CAPABILITIES = 1 << 4

_PAGE = 4096
_ABSENT_VENDOR = 0xFFFF


@dataclass(frozen=True)
class PciWindows:
    """The guest-physical ranges where BARs may be placed.

    The defaults suit ``q35`` and ``pc`` with less than 2 GiB of RAM: 32-bit
    MMIO above q35's ECAM window and below the I/O APIC, 64-bit MMIO from
    4 GiB, I/O ports from ``0xc000`` like SeaBIOS.  :meth:`query` asks QEMU.
    """

    mmio32: range = range(0xC000_0000, 0xFEC0_0000)
    mmio64: range = range(0x1_0000_0000, 0x1_8000_0000)
    io: range = range(0xC000, 0x1_0000)

    @classmethod
    async def query(cls, qmp: QmpClient) -> PciWindows:
        """The windows QEMU's host bridge reports (``pci-hole*`` properties).

        On q35 the 32-bit hole starts at the end of low RAM and contains the
        ECAM window, which firmware (or :func:`enable_q35_ecam`) puts at
        :data:`Q35_ECAM_BASE`, so placement starts above it.
        """
        children = await qmp.qom_list("/machine")
        if "q35" in children:
            host = "/machine/q35"
        elif "i440fx" in children:
            host = "/machine/i440fx"
        else:
            raise PciError("the machine has neither a q35 nor an i440fx host bridge")
        hole = range(await qmp.qom_get(host, "pci-hole-start"), await qmp.qom_get(host, "pci-hole-end"))
        hole64 = range(
            await qmp.qom_get(host, "pci-hole64-start"),
            await qmp.qom_get(host, "pci-hole64-end"),
        )
        mmio32_start = hole.start
        if host == "/machine/q35":
            mmio32_start = max(mmio32_start, Q35_ECAM_BASE + Q35_ECAM_SIZE)
        return cls(mmio32=range(mmio32_start, hole.stop), mmio64=hole64)


class BarSpace(enum.Enum):
    """Which address space a BAR decodes, as sizing reads it back.

    Not :class:`vdev.BarKind`, which a device declares and which also fixes a
    memory BAR's width: the harness cannot import the model, and it only
    needs the space to allocate an address from.
    """

    MEMORY = "memory"
    IO = "io"


@dataclass(frozen=True)
class BarInfo:
    """What sizing a BAR found out."""

    index: int
    kind: BarSpace
    size: int
    is_64bit: bool = False
    prefetchable: bool = False


def _align_up(value: int, alignment: int) -> int:
    return -(-value // alignment) * alignment


class PciAllocator:
    """Bump allocation of BAR addresses inside :class:`PciWindows`, never reused.

    64-bit memory BARs go to the 64-bit window; that proves a device copes
    with addresses above 4 GiB, which is where a guest kernel may put them.
    """

    def __init__(self, windows: PciWindows) -> None:
        self._windows = {"mmio32": windows.mmio32, "mmio64": windows.mmio64, "io": windows.io}
        self._next = {name: window.start for name, window in self._windows.items()}

    def allocate(self, bar: BarInfo) -> int:
        """An address for ``bar``, aligned to its size (memory BARs to at least a page)."""
        if bar.kind is BarSpace.IO:
            name, alignment = "io", bar.size
        else:
            name, alignment = ("mmio64" if bar.is_64bit else "mmio32"), max(bar.size, _PAGE)
        window = self._windows[name]
        address = _align_up(self._next[name], alignment)
        if address + bar.size > window.stop:
            raise PciError(f"no room for a {bar.size:#x}-byte BAR in the {name} window")
        self._next[name] = address + bar.size
        return address


class PciBus:
    """Configuration access, enumeration and BAR placement for one machine.

    ``config`` defaults to ports ``0xcf8``/``0xcfc``; pass the result of
    :func:`~vdev.qemu.pci_config.enable_q35_ecam` to reach extended
    configuration space.
    """

    def __init__(
        self,
        qtest: QTestClient,
        *,
        windows: PciWindows | None = None,
        config: ConfigAccess | None = None,
    ) -> None:
        self.qtest = qtest
        self.config: ConfigAccess = config if config is not None else PortConfigAccess(qtest)
        self.allocator = PciAllocator(windows if windows is not None else PciWindows())

    async def function(self, address: PciAddress) -> PciFunction:
        """The function at ``address``; :class:`PciError` if nothing answers there."""
        ids = await self.config.read(address, VENDOR_ID, 4)
        if ids & 0xFFFF == _ABSENT_VENDOR:
            raise PciError(f"no PCI function at {address}")
        class_revision = await self.config.read(address, CLASS_REVISION, 4)
        header_type = await self.config.read(address, HEADER_TYPE, 1)
        return PciFunction(
            self,
            address,
            vendor_id=ids & 0xFFFF,
            device_id=ids >> 16,
            class_code=class_revision >> 8,
            revision=class_revision & 0xFF,
            header_type=header_type,
        )

    async def enumerate(self, bus: int = 0) -> list[PciFunction]:
        """Every function on ``bus`` (a bus behind a bridge needs its bus numbers set)."""
        found = []
        for device in range(32):
            first = PciAddress(bus, device, 0)
            if await self.config.read(first, VENDOR_ID, 2) == _ABSENT_VENDOR:
                continue
            multifunction = await self.config.read(first, HEADER_TYPE, 1) & 0x80
            for function in range(8 if multifunction else 1):
                address = PciAddress(bus, device, function)
                if await self.config.read(address, VENDOR_ID, 2) != _ABSENT_VENDOR:
                    found.append(await self.function(address))
        return found

    async def find(self, vendor_id: int, device_id: int, *, bus: int = 0) -> PciFunction:
        """The first function on ``bus`` with these ids; :class:`PciError` if none."""
        for function in await self.enumerate(bus):
            if (function.vendor_id, function.device_id) == (vendor_id, device_id):
                return function
        raise PciError(f"no {vendor_id:04x}:{device_id:04x} function on bus {bus:02x}")


class PciFunction:
    """One PCI function: its identity, its configuration space and its BARs."""

    def __init__(
        self,
        bus: PciBus,
        address: PciAddress,
        *,
        vendor_id: int,
        device_id: int,
        class_code: int,
        revision: int,
        header_type: int,
    ) -> None:
        self.bus = bus
        self.address = address
        self.vendor_id = vendor_id
        self.device_id = device_id
        #: Base class, subclass and programming interface, e.g. ``0x010802`` for NVMe.
        self.class_code = class_code
        self.revision = revision
        self.header_type = header_type
        self._bars: dict[int, BarInfo] | None = None
        self._mapped: dict[int, tuple[BarInfo, int]] = {}

    def __repr__(self) -> str:
        return f"<PciFunction {self.address} {self.vendor_id:04x}:{self.device_id:04x} class {self.class_code:06x}>"

    @property
    def bar_count(self) -> int:
        """How many BAR registers the header has: 6, or 2 on a bridge."""
        return 2 if self.header_type & 0x7F == 1 else 6

    async def read_config(self, offset: int, size: int = 4) -> int:
        """Read ``size`` bytes of this function's configuration space."""
        return await self.bus.config.read(self.address, offset, size)

    async def write_config(self, offset: int, value: int, size: int = 4) -> None:
        """Write ``size`` bytes of this function's configuration space."""
        await self.bus.config.write(self.address, offset, value, size)

    async def enable(self, *, memory: bool = True, io: bool = True, master: bool = True) -> None:
        """Set the command register's decode and bus-master bits to exactly these values.

        Bus mastering is what lets the device write guest memory: DMA and MSI
        messages need it.
        """
        command = await self.read_config(COMMAND, 2)
        for bit, wanted in ((COMMAND_IO, io), (COMMAND_MEMORY, memory), (COMMAND_MASTER, master)):
            command = command | bit if wanted else command & ~bit
        await self.write_config(COMMAND, command, 2)

    async def interrupt_pin(self) -> int:
        """The legacy interrupt pin: 0 for none, 1 for INTA ... 4 for INTD."""
        return await self.read_config(INTERRUPT_PIN, 1)

    async def find_capability(self, cap_id: int) -> int | None:
        """The configuration offset of the first capability with this id, if any."""
        if not await self.read_config(STATUS, 2) & STATUS_CAPABILITIES:
            return None
        pointer = await self.read_config(CAPABILITIES_POINTER, 1) & 0xFC
        seen: set[int] = set()
        while pointer and pointer not in seen:
            seen.add(pointer)
            if await self.read_config(pointer, 1) == cap_id:
                return pointer
            pointer = await self.read_config(pointer + 1, 1) & 0xFC
        return None

    # -- BARs ---------------------------------------------------------------------

    async def bars(self) -> dict[int, BarInfo]:
        """Every implemented BAR by index (the lower index for 64-bit pairs).

        Sizing rewrites the BARs, so it runs once with decoding turned off
        and its result is kept: sizes never change.
        """
        if self._bars is None:
            command = await self.read_config(COMMAND, 2)
            await self.write_config(COMMAND, command & ~(COMMAND_IO | COMMAND_MEMORY), 2)
            try:
                self._bars = await self._size_bars()
            finally:
                await self.write_config(COMMAND, command, 2)
        return self._bars

    async def _size_bars(self) -> dict[int, BarInfo]:
        found = {}
        index = 0
        while index < self.bar_count:
            bar = await self._size_one(index)
            if bar is not None:
                found[index] = bar
            index += 2 if bar is not None and bar.is_64bit else 1
        return found

    async def _probe(self, offset: int) -> tuple[int, int]:
        """(original, read back after writing all-ones), with the original restored."""
        original = await self.read_config(offset)
        await self.write_config(offset, 0xFFFF_FFFF)
        mask = await self.read_config(offset)
        await self.write_config(offset, original)
        return original, mask

    async def _size_one(self, index: int) -> BarInfo | None:
        offset = BAR0 + 4 * index
        original, mask = await self._probe(offset)
        if original & 1:
            # Some I/O BARs decode only 16 bits and read the upper half as 0.
            bits = mask & 0xFFFF_FFFC
            if not bits:
                return None
            return BarInfo(index, BarSpace.IO, ((~(bits | 0xFFFF_0000)) & 0xFFFF_FFFF) + 1)
        is_64bit = (original >> 1) & 3 == 2
        bits = mask & 0xFFFF_FFF0
        width = 32
        if is_64bit:
            _, upper = await self._probe(offset + 4)
            bits |= upper << 32
            width = 64
        if not bits:
            return None
        size = (~bits & ((1 << width) - 1)) + 1
        return BarInfo(index, BarSpace.MEMORY, size, is_64bit, bool(original & 8))

    async def size_bar(self, index: int) -> BarInfo | None:
        """What BAR ``index`` decodes, or ``None`` if it is not implemented.

        Raises ``ValueError`` for the upper half of a 64-bit BAR.
        """
        if not 0 <= index < self.bar_count:
            raise ValueError(f"BAR index must be below {self.bar_count}, not {index}")
        bars = await self.bars()
        if index - 1 in bars and bars[index - 1].is_64bit:
            raise ValueError(f"BAR {index} is the upper half of 64-bit BAR {index - 1}")
        return bars.get(index)

    async def map_bars(self) -> dict[int, int]:
        """Place every BAR in the bus's windows; return ``{index: address}``.

        Decoding stays as it was: call :meth:`enable` to make the BARs live.
        """
        placed = {}
        for index, bar in (await self.bars()).items():
            address = self.bus.allocator.allocate(bar)
            offset = BAR0 + 4 * index
            await self.write_config(offset, address & 0xFFFF_FFFF)
            if bar.is_64bit:
                await self.write_config(offset + 4, address >> 32)
            self._mapped[index] = (bar, address)
            placed[index] = address
        return placed

    def bar_address(self, index: int) -> int:
        """Where :meth:`map_bars` placed BAR ``index``."""
        return self._mapped_bar(index)[1]

    def _mapped_bar(self, index: int) -> tuple[BarInfo, int]:
        try:
            return self._mapped[index]
        except KeyError:
            raise PciError(f"BAR {index} of {self.address} is not mapped: call map_bars()") from None

    def _bar_target(self, index: int, offset: int, size: int) -> tuple[BarInfo, int]:
        bar, address = self._mapped_bar(index)
        if not 0 <= offset <= bar.size - size:
            raise ValueError(f"{size}-byte access at {offset:#x} is outside BAR {index} ({bar.size:#x} bytes)")
        return bar, address + offset

    async def bar_read(self, index: int, offset: int, size: int) -> int:
        """Read ``size`` bytes (1, 2, 4; 8 for memory BARs) at ``offset`` into a mapped BAR."""
        bar, target = self._bar_target(index, offset, size)
        if bar.kind is BarSpace.IO:
            return await self.bus.qtest.port_read(target, size)
        return await self.bus.qtest.read(target, size)

    async def bar_write(self, index: int, offset: int, value: int, size: int) -> None:
        """Write ``size`` bytes (1, 2, 4; 8 for memory BARs) at ``offset`` into a mapped BAR."""
        bar, target = self._bar_target(index, offset, size)
        if bar.kind is BarSpace.IO:
            await self.bus.qtest.port_write(target, value, size)
        else:
            await self.bus.qtest.write(target, value, size)

    async def bar_readb(self, index: int, offset: int) -> int:
        """Read one byte from a mapped BAR."""
        return await self.bar_read(index, offset, 1)

    async def bar_readw(self, index: int, offset: int) -> int:
        """Read 16 bits from a mapped BAR."""
        return await self.bar_read(index, offset, 2)

    async def bar_readl(self, index: int, offset: int) -> int:
        """Read 32 bits from a mapped BAR."""
        return await self.bar_read(index, offset, 4)

    async def bar_readq(self, index: int, offset: int) -> int:
        """Read 64 bits from a mapped memory BAR."""
        return await self.bar_read(index, offset, 8)

    async def bar_writeb(self, index: int, offset: int, value: int) -> None:
        """Write one byte to a mapped BAR."""
        await self.bar_write(index, offset, value, 1)

    async def bar_writew(self, index: int, offset: int, value: int) -> None:
        """Write 16 bits to a mapped BAR."""
        await self.bar_write(index, offset, value, 2)

    async def bar_writel(self, index: int, offset: int, value: int) -> None:
        """Write 32 bits to a mapped BAR."""
        await self.bar_write(index, offset, value, 4)

    async def bar_writeq(self, index: int, offset: int, value: int) -> None:
        """Write 64 bits to a mapped memory BAR."""
        await self.bar_write(index, offset, value, 8)


def q35_intx_gsi(address: PciAddress, pin: int) -> int:
    """The I/O APIC input (GSI) a bus-0 q35 device's INTx pin drives.

    QEMU's ICH9 always feeds PIRQA-H into GSIs 16-23 (its PIRQ routing
    registers only steer the legacy PIC), and wires slots 1-24 to PIRQE-H
    rotated by slot: ``PIRQE + (slot + pin - 1) % 4``; checked for slots 1-5
    against QEMU 11.1.  Slot 0 and the chipset's slots 25-31 are wired
    differently and are not covered.  (On ``pc`` INTx reaches the I/O APIC
    only once firmware programs the PIIX3 PIRQ routing; nothing does that
    under qtest.)
    """
    if address.bus != 0 or not 1 <= address.device <= 24:
        raise ValueError(f"{address}: only q35 bus-0 slots 1-24 have the PIRQE-H rotation")
    if not 1 <= pin <= 4:
        raise ValueError(f"interrupt pin must be 1 (INTA) to 4 (INTD), not {pin}")
    return 16 + 4 + (address.device + pin - 1) % 4
