"""BARs: what a device declares (:class:`Bar`) and what each instance holds (:class:`BarState`).

A BAR is one vfio-user region.  Parts of it may be *mapped*: backed by one
memfd per BAR, handed to the client with sparse-mmap areas as offsets into
that fd (QEMU accepts exactly one fd per region).  Everything else is
*trapped*: each access arrives as a message and is dispatched to registers or
to the BAR's raw ``read``/``write`` handlers.  A trapped access that falls in
a mapped area (a client may always use REGION_READ) is served from the memfd,
so both paths see the same bytes.
"""

from __future__ import annotations

import enum
import mmap
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vdev.model.memory import MappedMemory
from vdev.model.memory_enable import DisabledAccess, DisabledMapping, Prefault
from vdev.model.registers import ReadHook, Register, RegisterFile, WriteHook, call_hook

if TYPE_CHECKING:
    from vdev.model.device import Device

PAGE_SIZE = mmap.PAGESIZE


class BarKind(enum.Enum):
    """Address space and width of a BAR."""

    MEM32 = "mem32"
    MEM64 = "mem64"
    IO = "io"


@dataclass(frozen=True)
class MappedArea:
    """A page-aligned span of a BAR that the client may mmap."""

    offset: int
    size: int

    def __post_init__(self) -> None:
        if self.offset % PAGE_SIZE or self.size % PAGE_SIZE or self.size <= 0:
            raise ValueError(f"mapped area {self.offset:#x}+{self.size:#x} must be whole pages")

    @property
    def end(self) -> int:
        return self.offset + self.size


RawRead = Callable[[Any, int, int], Any]
RawWrite = Callable[[Any, int, bytes], Any]


class Bar:
    """A BAR declared on a device class.

    Assign it to a class attribute named ``bar0`` … ``bar5`` (or pass
    ``index``).  Hooks are looked up by method name on each device, so a
    subclass changes a register's behaviour by overriding the method.  ``when_disabled``, ``mapping_when_disabled`` and
    ``prefault`` are the memory-enable policies of
    :mod:`vdev.model.memory_enable`.  Hooks are attached with the
    decorators::

        bar0 = Bar(4096, registers=[Register("doorbell", 0x0)])

        @bar0.on_write("doorbell")
        async def ring(self, value: int) -> None: ...
    """

    def __init__(
        self,
        size: int,
        *,
        kind: BarKind | str = BarKind.MEM32,
        prefetchable: bool = False,
        registers: Sequence[Register] = (),
        mapped: Sequence[MappedArea | tuple[int, int]] = (),
        read: RawRead | None = None,
        write: RawWrite | None = None,
        index: int | None = None,
        when_disabled: DisabledAccess | str = DisabledAccess.MASTER_ABORT,
        mapping_when_disabled: DisabledMapping | str = DisabledMapping.KEEP,
        prefault: Prefault | str = Prefault.LAZY,
    ) -> None:
        self.kind = BarKind(kind)
        self.when_disabled = DisabledAccess(when_disabled)
        self.mapping_when_disabled = DisabledMapping(mapping_when_disabled)
        self.prefault = Prefault(prefault)
        if size <= 0 or size & (size - 1):
            raise ValueError(f"BAR size must be a power of two, not {size:#x}")
        if self.kind is BarKind.IO and (size < 4 or size > 256):
            raise ValueError("I/O BARs are 4 to 256 bytes")
        if self.kind is not BarKind.IO and size < 16:
            raise ValueError("memory BARs are at least 16 bytes")
        if self.kind is BarKind.MEM32 and size > 1 << 31:
            raise ValueError("a 32-bit BAR cannot exceed 2 GiB; use kind='mem64'")
        self.size = size
        self.prefetchable = prefetchable
        self.registers = tuple(registers)
        self.mapped = tuple(a if isinstance(a, MappedArea) else MappedArea(*a) for a in mapped)
        for area in self.mapped:
            if area.end > size:
                raise ValueError(f"mapped area {area} exceeds the BAR")
            if self.kind is BarKind.IO:
                raise ValueError("I/O BARs cannot be mapped")
        for register in self.registers:
            if register.end > size:
                raise ValueError(f"register {register.name} lies outside the BAR")
            if any(a.offset < register.end and register.offset < a.end for a in self.mapped):
                raise ValueError(f"register {register.name} lies in a mapped area")
        self.raw_read = read
        self.raw_write = write
        self.index = index
        self.read_hooks: dict[str, ReadHook] = {}
        self.write_hooks: dict[str, WriteHook] = {}

    def __set_name__(self, owner: type, name: str) -> None:
        if self.index is None:
            match = re.fullmatch(r"bar([0-5])", name)
            if not match:
                raise TypeError(f"{owner.__name__}.{name}: name the attribute bar0..bar5 or pass index=")
            self.index = int(match.group(1))
        self.attribute = name

    def __get__(self, instance: Device | None, owner: type) -> Any:
        if instance is None:
            return self
        return instance.bar(self.index if self.index is not None else -1)

    def on_read(self, register: str) -> Callable[[ReadHook], ReadHook]:
        """Decorate a method returning the register's value when it is read."""
        self._check_register(register)

        def decorate(hook: ReadHook) -> ReadHook:
            self.read_hooks[register] = hook
            return hook

        return decorate

    def on_write(self, register: str) -> Callable[[WriteHook], WriteHook]:
        """Decorate a method called with the register's new value after a write."""
        self._check_register(register)

        def decorate(hook: WriteHook) -> WriteHook:
            self.write_hooks[register] = hook
            return hook

        return decorate

    def _check_register(self, name: str) -> None:
        if all(r.name != name for r in self.registers):
            raise KeyError(f"no register {name} in this BAR")

    @property
    def is_64bit(self) -> bool:
        return self.kind is BarKind.MEM64

    def flags_bits(self) -> int:
        """The low BAR register bits: space, type and prefetchable."""
        if self.kind is BarKind.IO:
            return 0x1
        return (0x4 if self.is_64bit else 0x0) | (0x8 if self.prefetchable else 0x0)


def _bind(device: Device, hook: Callable[..., Any]) -> Callable[..., Any]:
    """The device's method of the hook's name, so a subclass that overrides it is the one called."""
    method = getattr(device, hook.__name__, None)
    return method if callable(method) else hook.__get__(device, type(device))


class BarState:
    """One device instance's BAR: register values and the memfd behind mapped areas."""

    def __init__(self, spec: Bar, device: Device) -> None:
        self.spec = spec
        self.index = spec.index if spec.index is not None else -1
        self.device = device
        self.registers = RegisterFile(
            spec.registers,
            {name: _bind(device, hook) for name, hook in spec.read_hooks.items()},
            {name: _bind(device, hook) for name, hook in spec.write_hooks.items()},
        )
        self.raw_read = _bind(device, spec.raw_read) if spec.raw_read else None
        self.raw_write = _bind(device, spec.raw_write) if spec.raw_write else None
        self.mapped = MappedMemory(f"vdev-{device.name}-bar{self.index}", spec.size) if spec.mapped else None
        #: Memory-enable policies, from the declaration; experiments may change them at any time.
        self.when_disabled = spec.when_disabled
        self.mapping_when_disabled = spec.mapping_when_disabled
        self.prefault = spec.prefault

    @property
    def size(self) -> int:
        return self.spec.size

    @property
    def fd(self) -> int:
        """The memfd the client maps (-1 for a BAR without mapped areas)."""
        return self.mapped.fd if self.mapped is not None else -1

    @property
    def memory(self) -> mmap.mmap:
        """The device's view of the BAR's mapped memory (whole BAR, offsets as in the BAR)."""
        if self.mapped is None:
            raise AttributeError(f"BAR{self.index} has no mapped areas")
        return self.mapped.view

    def __getitem__(self, register: str) -> int:
        return self.registers[register]

    def __setitem__(self, register: str, value: int) -> None:
        self.registers[register] = value

    def mapped_area_at(self, offset: int, size: int) -> MappedArea | None:
        for area in self.spec.mapped:
            if area.offset <= offset and offset + size <= area.end:
                return area
        return None

    async def read(self, offset: int, size: int) -> bytes:
        """A trapped read: mapped memory, raw handler, or registers, in that order."""
        if self.mapped is not None and self.mapped_area_at(offset, size):
            return self.memory[offset : offset + size]
        if self.raw_read is not None and not self.registers.covers(offset, size):
            result = await call_hook(self.raw_read, offset, size)
            return result if isinstance(result, bytes) else int(result).to_bytes(size, "little")
        value = await self.registers.read(offset, size)
        return value.to_bytes(size, "little")

    async def write(self, offset: int, data: bytes) -> None:
        """A trapped write, dispatched like :meth:`read`."""
        size = len(data)
        if self.mapped is not None and self.mapped_area_at(offset, size):
            self.memory[offset : offset + size] = data
            return
        if self.raw_write is not None and not self.registers.covers(offset, size):
            await call_hook(self.raw_write, offset, data)
            return
        await self.registers.write(offset, size, int.from_bytes(data, "little"))

    @property
    def decoding_bit(self) -> str:
        """The COMMAND bit that enables this BAR: ``memory`` or ``io``."""
        return "io" if self.spec.kind is BarKind.IO else "memory"

    def memory_disabled(self) -> None:
        """Decoding went off: apply the mapped-area policy."""
        if self.mapped is None:
            return
        policy = self.mapping_when_disabled
        if policy is not DisabledMapping.KEEP:
            saved = self.mapped.revoke(keep_contents=policy is DisabledMapping.REVOKE)
            self.device.events.record("memory", bar=self.index, action=policy.value, saved_bytes=saved)

    def memory_enabled(self) -> None:
        """Decoding came back: restore the mapped areas per the prefault policy."""
        if self.mapped is None:
            return
        was_revoked = self.mapped.revoked
        populate = self.prefault is Prefault.POPULATE
        self.mapped.restore(populate=populate)
        if was_revoked or populate:
            self.device.events.record("memory", bar=self.index, action="restore", prefault=self.prefault.value)

    def reset(self) -> None:
        self.registers.reset()

    def close(self) -> None:
        if self.mapped is not None:
            self.mapped.close()
            self.mapped = None
