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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from vdev.model.errors import DefinitionError
from vdev.model.events import MemoryAction
from vdev.model.memory import MappedMemory
from vdev.model.memory_enable import DisabledAccess, DisabledMapping, Prefault
from vdev.model.registers import AccessSizes, ReadHook, Register, RegisterFile, WriteHook, call_hook

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
            raise DefinitionError(
                f"mapped area at {_span(self.offset, self.size)} must be whole pages of {PAGE_SIZE} bytes"
            )

    @property
    def end(self) -> int:
        return self.offset + self.size


RawRead = Callable[[Any, int, int], Any]
RawWrite = Callable[[Any, int, bytes], Any]
Policy = TypeVar("Policy", bound=enum.Enum)


def coerce_policy(kind: type[Policy], value: Policy | str, what: str) -> Policy:
    """``value`` as a member of ``kind``: the member itself or its documented string.

    Anything else is refused, so a typo never silently picks a behaviour.
    """
    if isinstance(value, kind):
        return value
    if isinstance(value, str):
        for member in kind:
            if member.value == value:
                return member
    choices = ", ".join(repr(member.value) for member in kind)
    raise ValueError(f"{what} must be one of {choices} (or a {kind.__name__}), not {value!r}")


def _span(offset: int, size: int) -> str:
    return f"{offset:#x} ({size} byte{'s' if size != 1 else ''})"


class Bar:
    """A BAR declared on a device class.

    Assign it to a class attribute named ``bar0`` … ``bar5`` (or pass
    ``index``).  Hooks are looked up by method name on each device, so a
    subclass changes a register's behaviour by overriding the method.  ``when_disabled``, ``mapping_when_disabled`` and
    ``prefault`` are the memory-enable policies of
    :mod:`vdev.model.memory_enable`.  ``sizes`` are the access sizes the
    BAR decodes at all (:class:`~vdev.model.registers.AccessSizes`; default:
    every size): any other trapped access outside the mapped areas is
    refused before a register or handler sees it, the way a memory region
    with a minimum access size refuses narrower ones.  Hooks are attached with the
    decorators::

        bar0 = Bar(4096, registers=[Register("doorbell", 0x0)])

        @bar0.on_write("doorbell")
        async def ring(self, value: int) -> None: ...

    The layout is checked when the device class is created (or, for BARs
    built by :meth:`Device.bar_specs`, when the device is): a mistake raises
    :class:`~vdev.model.errors.DefinitionError` naming the class, the BAR,
    the offset and the size.
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
        sizes: AccessSizes | None = None,
    ) -> None:
        # Mistakes are collected here and raised by check(), which knows the
        # class and attribute the BAR belongs to.
        self._problems: list[str] = []
        self.kind = self._coerce(BarKind, kind, "kind", BarKind.MEM32)
        self.when_disabled = self._coerce(DisabledAccess, when_disabled, "when_disabled", DisabledAccess.MASTER_ABORT)
        self.mapping_when_disabled = self._coerce(
            DisabledMapping, mapping_when_disabled, "mapping_when_disabled", DisabledMapping.KEEP
        )
        self.prefault = self._coerce(Prefault, prefault, "prefault", Prefault.LAZY)
        self.size = size
        self.prefetchable = prefetchable
        self.registers = tuple(registers)
        self.mapped = tuple(area for area in (self._area(a) for a in mapped) if area is not None)
        self.raw_read = read
        self.raw_write = write
        self.sizes = sizes
        if sizes is not None:
            self._problems.extend(f"sizes: {problem}" for problem in sizes.problems())
        self.index = index
        self.attribute: str | None = None
        self.read_hooks: dict[str, ReadHook] = {}
        self.write_hooks: dict[str, WriteHook] = {}

    def _coerce(self, kind: type[Policy], value: Policy | str, what: str, default: Policy) -> Policy:
        try:
            return coerce_policy(kind, value, what)
        except ValueError as exc:
            self._problems.append(str(exc))
            return default

    def _area(self, area: MappedArea | tuple[int, int]) -> MappedArea | None:
        if isinstance(area, MappedArea):
            return area
        try:
            return MappedArea(*area)
        except (TypeError, ValueError) as exc:
            self._problems.append(str(exc))
            return None

    def __set_name__(self, owner: type, name: str) -> None:
        self.attribute = name
        if self.index is None:
            match = re.fullmatch(r"bar([0-5])", name)
            if match:
                self.index = int(match.group(1))

    def __get__(self, instance: Device | None, owner: type) -> Any:
        if instance is None:
            return self
        return instance.bar(self.index if self.index is not None else -1)

    def on_read(self, register: str) -> Callable[[ReadHook], ReadHook]:
        """Decorate a method returning the register's value when it is read."""

        def decorate(hook: ReadHook) -> ReadHook:
            self.read_hooks[register] = hook
            return hook

        return decorate

    def on_write(self, register: str) -> Callable[[WriteHook], WriteHook]:
        """Decorate a method called with the register's new value after a write."""

        def decorate(hook: WriteHook) -> WriteHook:
            self.write_hooks[register] = hook
            return hook

        return decorate

    def check(self, owner: str) -> None:
        """Refuse a layout that cannot work, naming ``owner`` (the device class) and this BAR."""
        where = f"{owner}.{self.attribute}" if self.attribute else owner
        if self.index is None:
            raise DefinitionError(f"{where}: name the attribute bar0..bar5 or pass index=")
        if self.index not in range(6):
            raise DefinitionError(f"{where}: BAR index must be 0..5, not {self.index}")
        where = f"{where} (BAR{self.index})" if self.attribute != f"bar{self.index}" else where
        for problem in self._layout_problems():
            raise DefinitionError(f"{where}: {problem}")

    def _layout_problems(self) -> Iterator[str]:
        yield from self._problems
        size = self.size
        if not isinstance(size, int) or size <= 0 or size & (size - 1):
            yield f"size must be a power of two, not {size!r}"
            return
        if self.kind is BarKind.IO and (size < 4 or size > 256):
            yield f"an I/O BAR is 4 to 256 bytes, not {size}"
        if self.kind is not BarKind.IO and size < 16:
            yield f"a memory BAR is at least 16 bytes, not {size}"
        if self.kind is BarKind.MEM32 and size > 1 << 31:
            yield f"a 32-bit BAR cannot exceed 2 GiB ({size:#x} bytes); use kind='mem64'"
        for area in self.mapped:
            if self.kind is BarKind.IO:
                yield f"mapped area at {_span(area.offset, area.size)}: an I/O BAR cannot be mapped"
            if area.end > size:
                yield f"mapped area at {_span(area.offset, area.size)} ends beyond the BAR ({size:#x} bytes)"
        areas = sorted(self.mapped, key=lambda a: a.offset)
        for first, second in zip(areas, areas[1:]):
            if second.offset < first.end:
                yield f"mapped areas at {first.offset:#x} and {second.offset:#x} overlap"
        seen: dict[str, Register] = {}
        for register in self.registers:
            span = _span(register.offset, register.width)
            if register.name in seen:
                yield f"two registers named {register.name!r} (at {seen[register.name].offset:#x} and {span})"
            seen[register.name] = register
            if register.offset < 0 or register.end > size:
                yield f"register {register.name!r} at {span} lies outside the BAR ({size:#x} bytes)"
            for area in self.mapped:
                if area.offset < register.end and register.offset < area.end:
                    yield (
                        f"register {register.name!r} at {span} lies in the mapped area at"
                        f" {_span(area.offset, area.size)}"
                    )
        ordered = sorted(self.registers, key=lambda r: r.offset)
        for before, after in zip(ordered, ordered[1:]):
            if after.offset < before.end:
                yield (
                    f"registers {before.name!r} at {_span(before.offset, before.width)} and"
                    f" {after.name!r} at {_span(after.offset, after.width)} overlap"
                )
        names = ", ".join(seen) or "none"
        for hooks, what in ((self.read_hooks, "on_read"), (self.write_hooks, "on_write")):
            for register_name, hook in hooks.items():
                if register_name not in seen:
                    yield (
                        f"{what}({register_name!r}) on {getattr(hook, '__name__', hook)}: no such register"
                        f" in this BAR (registers: {names})"
                    )

    def overlaps(self, offset: int, size: int) -> Iterator[str]:
        """What of this BAR's layout (registers, mapped areas) overlaps ``[offset, offset + size)``."""
        for register in self.registers:
            if register.offset < offset + size and offset < register.end:
                yield f"register {register.name!r} at {_span(register.offset, register.width)}"
        for area in self.mapped:
            if area.offset < offset + size and offset < area.end:
                yield f"the mapped area at {_span(area.offset, area.size)}"

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
        self._when_disabled = spec.when_disabled
        self._mapping_when_disabled = spec.mapping_when_disabled
        self._prefault = spec.prefault

    # Memory-enable policies, from the declaration; experiments may change them
    # at any time, with the enum member or its string (anything else is refused).

    @property
    def when_disabled(self) -> DisabledAccess:
        """What a trapped access does while decoding is off (:class:`DisabledAccess`)."""
        return self._when_disabled

    @when_disabled.setter
    def when_disabled(self, value: DisabledAccess | str) -> None:
        self._when_disabled = coerce_policy(DisabledAccess, value, "when_disabled")

    @property
    def mapping_when_disabled(self) -> DisabledMapping:
        """What the mapped areas do while decoding is off (:class:`DisabledMapping`)."""
        return self._mapping_when_disabled

    @mapping_when_disabled.setter
    def mapping_when_disabled(self, value: DisabledMapping | str) -> None:
        self._mapping_when_disabled = coerce_policy(DisabledMapping, value, "mapping_when_disabled")

    @property
    def prefault(self) -> Prefault:
        """How mapped pages come back when decoding is turned on (:class:`Prefault`)."""
        return self._prefault

    @prefault.setter
    def prefault(self, value: Prefault | str) -> None:
        self._prefault = coerce_policy(Prefault, value, "prefault")

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
        try:  # the registers' values directly: handlers read registers on every access
            return self.registers.values[register]
        except KeyError:
            return self.registers[register]  # the clear error

    def __setitem__(self, register: str, value: int) -> None:
        self.registers[register] = value

    def mapped_area_at(self, offset: int, size: int) -> MappedArea | None:
        for area in self.spec.mapped:
            if area.offset <= offset and offset + size <= area.end:
                return area
        return None

    def accepts(self, offset: int, size: int, *, write: bool) -> bool:
        """Whether the BAR's and its registers' size policies take this trapped access."""
        sizes = self.spec.sizes
        if sizes is not None and not sizes.accepts(size, write=write):
            return False
        return self.registers.refusing(offset, size, write=write) is None

    async def read(self, offset: int, size: int) -> bytes:
        """A trapped read: mapped memory, raw handler, or registers, in that order."""
        if self.mapped is not None and self.mapped_area_at(offset, size):
            return self.memory[offset : offset + size]
        if self.spec.sizes is not None and not self.spec.sizes.accepts(size, write=False):
            refused = self.spec.sizes.refuse(size, write=False, what=f"at BAR{self.index}+{offset:#x}")
            return refused.to_bytes(size, "little")
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
        if self.spec.sizes is not None and not self.spec.sizes.accepts(size, write=True):
            self.spec.sizes.refuse(size, write=True, what=f"at BAR{self.index}+{offset:#x}")
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
            self.device.events.record(MemoryAction(bar=self.index, action=policy.value, saved_bytes=saved))

    def memory_enabled(self) -> None:
        """Decoding came back: restore the mapped areas per the prefault policy."""
        if self.mapped is None:
            return
        was_revoked = self.mapped.revoked
        populate = self.prefault is Prefault.POPULATE
        self.mapped.restore(populate=populate)
        if was_revoked or populate:
            self.device.events.record(MemoryAction(bar=self.index, action="restore", prefault=self.prefault.value))

    def reset(self) -> None:
        self.registers.reset()

    def close(self) -> None:
        if self.mapped is not None:
            self.mapped.close()
            self.mapped = None
