"""Config space emulation: the type-0 header, BAR sizing and the capability chains.

vdev owns every config access (libvfio-user's config region is registered
with ``VFU_REGION_FLAG_ALWAYS_CB``), because the library's own header
emulation only logs COMMAND changes and vdev must decide what they do.

Rules:

* Each byte has a write mask (bits the client may change) and a clear mask
  (RW1C bits, cleared by writing 1).  Everything else is read-only.
* BAR registers are not plain bytes: a write stores only the address bits
  a BAR of that size decodes, so writing all-ones and reading back yields
  the size mask, as PCI requires.  The upper half of a 64-bit BAR is
  writable in full (above the size).
* Capabilities are placed from 0x40 (standard) and 0x100 (extended, PCIe
  only) in declaration order, dword-aligned, and chained.
* Device-specific registers at fixed offsets (hardware puts error and
  control registers in config space outside any capability) are declared as
  :class:`~vdev.model.registers.Register` objects: ``RO``, ``RW`` and
  ``RW1C`` bits (and fields) become the bytes' masks.  They may not overlap
  the header, a capability or each other.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from vdev.model.bars import Bar, BarKind
from vdev.model.capabilities import Capability, ExtendedCapability
from vdev.model.pci_regs import (
    COMMAND_WRITABLE,
    PCI_BASE_ADDRESS_0,
    PCI_CACHE_LINE_SIZE,
    PCI_CAPABILITY_LIST,
    PCI_COMMAND,
    PCI_COMMAND_INTX_DISABLE,
    PCI_COMMAND_IO,
    PCI_COMMAND_MASTER,
    PCI_COMMAND_MEMORY,
    PCI_COMMAND_SERR,
    PCI_INTERRUPT_LINE,
    PCI_INTERRUPT_PIN,
    PCI_LATENCY_TIMER,
    PCI_REVISION_ID,
    PCI_ROM_ADDRESS,
    PCI_STATUS,
    PCI_STATUS_CAP_LIST,
    PCI_SUBSYSTEM_VENDOR_ID,
    PCI_VENDOR_ID,
    STATUS_RW1C,
)
from vdev.model.registers import Access, Register

CONFIG_SIZE_CONVENTIONAL = 256
CONFIG_HEADER_SIZE = 0x40
CONFIG_SIZE_EXPRESS = 4096


@dataclass(frozen=True)
class CommandRegister:
    """The COMMAND register decoded into the bits devices and tests care about."""

    value: int

    @property
    def io(self) -> bool:
        return bool(self.value & PCI_COMMAND_IO)

    @property
    def memory(self) -> bool:
        return bool(self.value & PCI_COMMAND_MEMORY)

    @property
    def master(self) -> bool:
        return bool(self.value & PCI_COMMAND_MASTER)

    @property
    def serr(self) -> bool:
        return bool(self.value & PCI_COMMAND_SERR)

    @property
    def intx_disable(self) -> bool:
        return bool(self.value & PCI_COMMAND_INTX_DISABLE)

    def decoded(self) -> dict[str, bool]:
        return {
            "memory": self.memory,
            "io": self.io,
            "master": self.master,
            "serr": self.serr,
            "intx_disable": self.intx_disable,
        }


@dataclass(frozen=True)
class PlacedCapability:
    """A capability and where the layout put it, with its registers at their config-space offsets."""

    capability: Capability
    offset: int
    _registers: dict[str, Register] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        placed = {r.name: replace(r, offset=self.offset + r.offset) for r in self.capability.registers()}
        object.__setattr__(self, "_registers", placed)

    def register(self, name: str) -> Register:
        """The capability's register ``name``, its offset where it lies in config space."""
        try:
            return self._registers[name]
        except KeyError:
            known = ", ".join(self._registers) or "none"
            raise KeyError(f"{type(self.capability).__name__} has no register {name!r} (registers: {known})") from None


@dataclass(frozen=True)
class ConfigChange:
    """What a client's config write changed, for the device to act on."""

    offset: int
    size: int
    value: int
    old_command: CommandRegister
    new_command: CommandRegister
    capabilities: tuple[PlacedCapability, ...]

    def written(self, register: Register) -> int:
        """The bits the client wrote to ``register`` (0 in bytes the write did not cover).

        What a write-only command bit needs: it is never stored, so only the
        write itself says whether it was set.
        """
        first, last = max(self.offset, register.offset), min(self.offset + self.size, register.end)
        if first >= last:
            return 0
        covered = ((1 << (8 * (last - first))) - 1) << (8 * (first - register.offset))
        value = self.value >> (8 * (first - self.offset)) << (8 * (first - register.offset))
        return value & covered


class ConfigSpace:
    """The bytes of one device's config space and the rules for changing them."""

    def __init__(
        self,
        *,
        vendor_id: int,
        device_id: int,
        subsystem_vendor_id: int,
        subsystem_id: int,
        revision: int,
        class_code: int,
        express: bool,
        bars: Sequence[Bar],
        rom_size: int,
        interrupt_pin: int,
        capabilities: Sequence[Capability],
        registers: Sequence[Register] = (),
    ) -> None:
        self.size = CONFIG_SIZE_EXPRESS if express else CONFIG_SIZE_CONVENTIONAL
        self._bars: dict[int, Bar] = {bar.index: bar for bar in bars if bar.index is not None}
        self._rom_size = rom_size
        self._check_bar_slots()
        self.capabilities = self._place(capabilities, express)
        self.reset_image = bytearray(self.size)
        self.wmask = bytearray(self.size)
        self.w1cmask = bytearray(self.size)
        struct.pack_into("<HH", self.reset_image, PCI_VENDOR_ID, vendor_id, device_id)
        struct.pack_into("<I", self.reset_image, PCI_REVISION_ID, (class_code << 8) | revision)
        struct.pack_into("<HH", self.reset_image, PCI_SUBSYSTEM_VENDOR_ID, subsystem_vendor_id, subsystem_id)
        self.reset_image[PCI_INTERRUPT_PIN] = interrupt_pin
        struct.pack_into("<H", self.wmask, PCI_COMMAND, COMMAND_WRITABLE)
        struct.pack_into("<H", self.w1cmask, PCI_STATUS, STATUS_RW1C)
        self.wmask[PCI_CACHE_LINE_SIZE] = 0xFF
        self.wmask[PCI_LATENCY_TIMER] = 0xFF
        self.wmask[PCI_INTERRUPT_LINE] = 0xFF
        # BAR and ROM bytes take the raw value; _apply_bar_writes then keeps
        # only the bits a BAR of that size decodes.
        self.wmask[PCI_BASE_ADDRESS_0 : PCI_BASE_ADDRESS_0 + 24] = b"\xff" * 24
        self.wmask[PCI_ROM_ADDRESS : PCI_ROM_ADDRESS + 4] = b"\xff" * 4
        for index, bar in self._bars.items():
            self.reset_image[PCI_BASE_ADDRESS_0 + 4 * index] = bar.flags_bits()
        self._lay_out_capabilities()
        self._lay_out_registers(registers)
        self.data = bytearray(self.reset_image)

    def _check_bar_slots(self) -> None:
        for index, bar in self._bars.items():
            if bar.is_64bit and (index == 5 or index + 1 in self._bars):
                raise ValueError(f"64-bit BAR{index} needs BAR{index + 1} free for its upper half")
        if self._rom_size and (self._rom_size < 2048 or self._rom_size & (self._rom_size - 1)):
            raise ValueError("an expansion ROM is a power of two of at least 2 KiB")

    @staticmethod
    def _place(capabilities: Sequence[Capability], express: bool) -> tuple[PlacedCapability, ...]:
        placed: list[PlacedCapability] = []
        standard, extended = 0x40, 0x100
        for capability in capabilities:
            size = (capability.size + 3) & ~3
            if capability.extended:
                if not express:
                    raise ValueError(f"{type(capability).__name__} needs a PCI Express device")
                placed.append(PlacedCapability(capability, extended))
                extended += size
                if extended > CONFIG_SIZE_EXPRESS:
                    raise ValueError("extended capabilities do not fit in 4 KiB")
            else:
                placed.append(PlacedCapability(capability, standard))
                standard += size
                if standard > CONFIG_SIZE_CONVENTIONAL:
                    raise ValueError("capabilities do not fit in the first 256 bytes")
        return tuple(placed)

    def _lay_out_capabilities(self) -> None:
        standard = [p for p in self.capabilities if not p.capability.extended]
        extended = [p for p in self.capabilities if p.capability.extended]
        for placed in self.capabilities:
            cap, at = placed.capability, placed.offset
            self.reset_image[at : at + cap.size] = cap.image()
            self.wmask[at : at + cap.size] = cap.write_mask()
            self.w1cmask[at : at + cap.size] = cap.clear_mask()
        if standard:
            self.reset_image[PCI_CAPABILITY_LIST] = standard[0].offset
            struct.pack_into("<H", self.reset_image, PCI_STATUS, PCI_STATUS_CAP_LIST)
            for this, following in zip(standard, standard[1:] + [None]):
                self.reset_image[this.offset] = this.capability.cap_id
                self.reset_image[this.offset + 1] = following.offset if following else 0
        for this, following in zip(extended, extended[1:] + [None]):
            cap = this.capability
            version = cap.version if isinstance(cap, ExtendedCapability) else 1
            header = cap.cap_id | (version << 16) | ((following.offset if following else 0) << 20)
            struct.pack_into("<I", self.reset_image, this.offset, header)

    def _lay_out_registers(self, registers: Sequence[Register]) -> None:
        taken = [(0, CONFIG_HEADER_SIZE, "the header")]
        taken += [(p.offset, p.offset + p.capability.size, type(p.capability).__name__) for p in self.capabilities]
        if any(p.capability.extended for p in self.capabilities) or registers:
            taken.append((0x100, 0x104, "the extended capability header"))
        for register in registers:
            if register.end > self.size:
                raise ValueError(f"config register {register.name} lies outside the {self.size}-byte config space")
            for start, end, what in taken:
                if register.offset < end and start < register.end:
                    raise ValueError(f"config register {register.name} at {register.offset:#x} overlaps {what}")
            masks = register.access_masks()
            if masks[Access.W1S] or masks[Access.WO]:
                raise ValueError(f"config register {register.name}: only RO, RW and RW1C bits are supported")
            at, width = register.offset, register.width
            self.reset_image[at : at + width] = register.reset.to_bytes(width, "little")
            self.wmask[at : at + width] = masks[Access.RW].to_bytes(width, "little")
            self.w1cmask[at : at + width] = masks[Access.RW1C].to_bytes(width, "little")
            taken.append((at, register.end, f"config register {register.name}"))

    # -- access ------------------------------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        """Config bytes as the client sees them (out-of-range bytes read as zero)."""
        end = min(offset + size, self.size)
        return bytes(self.data[offset:end]).ljust(size, b"\0")

    def read_int(self, offset: int, size: int) -> int:
        return int.from_bytes(self.data[offset : offset + size], "little")

    def read_register(self, register: Register) -> int:
        """The current value of a placed capability's register (see :meth:`PlacedCapability.register`)."""
        return self.read_int(register.offset, register.width)

    def write_register(self, register: Register, value: int) -> None:
        """A device-side store into a placed capability's register: no masks."""
        self.write_int(register.offset, register.width, value)

    def write_int(self, offset: int, size: int, value: int) -> None:
        """A device-side store: no masks, no BAR rules."""
        self.data[offset : offset + size] = value.to_bytes(size, "little")

    @property
    def command(self) -> CommandRegister:
        return CommandRegister(self.read_int(PCI_COMMAND, 2))

    def write(self, offset: int, data: bytes) -> ConfigChange:
        """Apply a client write and report what changed."""
        old_command = self.command
        for i, byte in enumerate(data):
            at = offset + i
            if at >= self.size:
                break
            old = self.data[at]
            new = (old & ~self.wmask[at]) | (byte & self.wmask[at])
            new &= ~(byte & self.w1cmask[at])
            self.data[at] = new
        self._apply_bar_writes(offset, len(data))
        touched = tuple(
            p for p in self.capabilities if p.offset < offset + len(data) and offset < p.offset + p.capability.size
        )
        return ConfigChange(
            offset=offset,
            size=len(data),
            value=int.from_bytes(data, "little"),
            old_command=old_command,
            new_command=self.command,
            capabilities=touched,
        )

    def _apply_bar_writes(self, offset: int, size: int) -> None:
        """Recompute BAR registers the write touched, keeping only decodable address bits."""
        first, last = offset, offset + size
        for slot in range(6):
            at = PCI_BASE_ADDRESS_0 + 4 * slot
            if at < last and first < at + 4:
                self._store_bar_slot(slot, self.read_int(at, 4))
        if PCI_ROM_ADDRESS < last and first < PCI_ROM_ADDRESS + 4:
            value = self.read_int(PCI_ROM_ADDRESS, 4)
            stored = (value & ~(self._rom_size - 1) & 0xFFFFF800) | (value & 1) if self._rom_size else 0
            self.write_int(PCI_ROM_ADDRESS, 4, stored)

    def _store_bar_slot(self, slot: int, written: int) -> None:
        at = PCI_BASE_ADDRESS_0 + 4 * slot
        bar = self._bars.get(slot)
        upper_of = self._bars.get(slot - 1) if slot > 0 else None
        if bar is not None:
            if bar.kind is BarKind.IO:
                address_mask = ~(bar.size - 1) & 0xFFFFFFFC
            else:
                address_mask = ~(bar.size - 1) & 0xFFFFFFF0
            self.write_int(at, 4, (written & address_mask & 0xFFFFFFFF) | bar.flags_bits())
        elif upper_of is not None and upper_of.is_64bit:
            upper_mask = ~((upper_of.size - 1) >> 32) & 0xFFFFFFFF
            self.write_int(at, 4, written & upper_mask)
        else:
            self.write_int(at, 4, 0)

    def bar_address(self, index: int) -> int:
        """The address the client programmed into BAR ``index``."""
        bar = self._bars[index]
        low = self.read_int(PCI_BASE_ADDRESS_0 + 4 * index, 4)
        mask = 0xFFFFFFFC if bar.kind is BarKind.IO else 0xFFFFFFF0
        address = low & mask
        if bar.is_64bit:
            address |= self.read_int(PCI_BASE_ADDRESS_0 + 4 * (index + 1), 4) << 32
        return address

    def find(self, capability_type: type[Capability]) -> PlacedCapability | None:
        for placed in self.capabilities:
            if isinstance(placed.capability, capability_type):
                return placed
        return None

    def reset(self) -> None:
        """Back to the power-on image (addresses, COMMAND, capability state cleared)."""
        self.data[:] = self.reset_image
