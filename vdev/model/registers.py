"""Registers and fields described as data, and the dispatch of any access to them.

Rules this module enforces, so device code never has to:

* An access may have any size (1, 2, 4 or 8 bytes) and any alignment; it is
  split over the registers it overlaps.  Bytes no register covers read as 0
  and ignore writes, like unimplemented space on real hardware.
* A write changes a register bit by bit according to its access type:
  ``RO`` ignores writes, ``RW`` stores them, ``RW1C`` clears the bits written
  as 1, ``W1S`` sets them, and ``WO`` stores them but reads back 0.  A
  register may mix types through :class:`Field`.  Only the bytes the access
  covers are affected.
* A register may declare which access sizes it takes (:class:`AccessSizes`),
  as many devices decode only naturally sized, aligned accesses: an access
  that overlaps it and is not one of those sizes at its own offset is
  *refused* as a whole — a write changes nothing, a read returns the
  declared fill bytes — or fails, if the policy says so.  An accepted write
  narrower than the register may replace all of it (``zero_extend``), as
  hardware that latches a whole bus word does.  Without a policy a register
  takes every access.
* Hooks run after the write has been applied (``on_write(value)``) and
  before the read is answered (``on_read() -> value``); either may be
  ``async``.  Hooks run under the device's lock: plain ones in the thread
  serving the device, ``async`` ones in a Trio task (see
  :mod:`vdev.runtime.context`).
"""

from __future__ import annotations

import enum
import inspect
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

from vdev.model.errors import DefinitionError


class Access(enum.Enum):
    """How a register bit responds to reads and writes."""

    RO = "ro"
    RW = "rw"
    RW1C = "rw1c"
    W1S = "w1s"
    WO = "wo"


RO, RW, RW1C, W1S, WO = Access.RO, Access.RW, Access.RW1C, Access.W1S, Access.WO

#: Every access size a bus delivers.
ACCESS_SIZES = (1, 2, 4, 8)


class Refusal(enum.Enum):
    """What an access an :class:`AccessSizes` policy does not accept does."""

    #: The write changes nothing; the read returns the policy's fill bytes.
    IGNORE = "ignore"
    #: The access fails: :class:`AccessRefused` is raised, and the client's request gets an error reply.
    ERROR = "error"


class AccessRefused(Exception):
    """An access refused by an :class:`AccessSizes` policy whose refusal is :attr:`Refusal.ERROR`."""


@dataclass(frozen=True)
class AccessSizes:
    """Which access sizes something decodes, and what any other access does.

    On a :class:`Register`, ``reads`` and ``writes`` are the sizes accepted
    *at the register's own offset* (so none may exceed its width; an empty
    tuple refuses every read, or every write); an access that overlaps the
    register any other way is refused.  On a
    :class:`~vdev.model.bars.Bar`, they are the sizes the BAR decodes at
    all, anywhere: a refused access reaches no register and no handler.
    ``fill`` is the byte every byte of a refused read returns (``0xFF``:
    all-ones, what a PCI read nobody claims returns).  ``zero_extend``
    makes an accepted write narrower than the register replace all of it,
    its upper bytes zero; without it the write changes only the bytes it
    covers.
    """

    reads: tuple[int, ...] = ACCESS_SIZES
    writes: tuple[int, ...] = ACCESS_SIZES
    refused: Refusal = Refusal.IGNORE
    fill: int = 0xFF
    zero_extend: bool = False

    def problems(self) -> list[str]:
        """What is wrong with the policy itself (empty if nothing)."""
        found = [
            f"access size {size!r} is not one of {ACCESS_SIZES}"
            for size in (*self.reads, *self.writes)
            if size not in ACCESS_SIZES
        ]
        if not isinstance(self.refused, Refusal):
            found.append(f"refused must be Refusal.IGNORE or Refusal.ERROR, not {self.refused!r}")
        if not isinstance(self.fill, int) or not 0 <= self.fill <= 0xFF:
            found.append(f"fill is one byte (0..0xff), not {self.fill!r}")
        return found

    def accepts(self, size: int, *, write: bool) -> bool:
        return size in (self.writes if write else self.reads)

    def refuse(self, size: int, *, write: bool, what: str) -> int:
        """What a refused access returns (the fill, for a read), or :class:`AccessRefused` raised."""
        if self.refused is Refusal.ERROR:
            accepted = self.writes if write else self.reads
            sizes = ", ".join(map(str, accepted)) or "none"
            raise AccessRefused(f"{size}-byte {'write' if write else 'read'} {what} (accepted sizes: {sizes})")
        return int.from_bytes(bytes([self.fill]) * size, "little")


@dataclass(frozen=True)
class Field:
    """A run of bits inside a register with its own access type."""

    name: str
    lsb: int
    width: int = 1
    access: Access = RW

    @property
    def mask(self) -> int:
        return ((1 << self.width) - 1) << self.lsb

    def extract(self, register_value: int) -> int:
        """The field's value within ``register_value``, shifted down to bit 0."""
        return (register_value & self.mask) >> self.lsb

    def insert(self, register_value: int, value: int) -> int:
        """``register_value`` with the field set to ``value`` (which must fit)."""
        if value < 0 or value >> self.width:
            raise ValueError(f"field {self.name!r} is {self.width} bits wide; {value:#x} does not fit")
        return (register_value & ~self.mask) | (value << self.lsb)


@dataclass(frozen=True)
class Register:
    """One register of a trapped area: where it is, how wide, how it behaves.

    ``fields`` refine ``access`` for some bits; bits no field names keep the
    register's own access type.  ``sizes`` declares the accesses it takes
    (:class:`AccessSizes`; default: every size and alignment).  A ``sticky`` register keeps its value
    through device resets and FLR, like PCIe's sticky (``*S``) bits — the way
    to keep state that must outlive a client, since QEMU resets the device
    whenever it attaches.
    """

    name: str
    offset: int
    width: int = 4
    access: Access = RW
    reset: int = 0
    fields: tuple[Field, ...] = ()
    sticky: bool = False
    sizes: AccessSizes | None = None
    doc: str = ""

    def __post_init__(self) -> None:
        where = f"register {self.name!r} at {self.offset:#x}"
        if self.width not in (1, 2, 4, 8):
            raise DefinitionError(f"{where}: width must be 1, 2, 4 or 8 bytes, not {self.width!r}")
        if not isinstance(self.access, Access):
            raise DefinitionError(f"{where}: access must be RO, RW, RW1C, W1S or WO, not {self.access!r}")
        if self.reset < 0 or self.reset >> (8 * self.width):
            raise DefinitionError(f"{where}: reset value {self.reset:#x} does not fit in {self.width} bytes")
        for f in self.fields:
            if f.lsb < 0 or f.width <= 0 or f.lsb + f.width > 8 * self.width:
                raise DefinitionError(
                    f"{where}: field {f.name!r} (bits {f.lsb}..{f.lsb + f.width - 1}) does not fit in"
                    f" {8 * self.width} bits"
                )
        if self.sizes is not None:
            for problem in self.sizes.problems():
                raise DefinitionError(f"{where}: {problem}")
            wider = [size for size in (*self.sizes.reads, *self.sizes.writes) if size > self.width]
            if wider:
                raise DefinitionError(
                    f"{where}: accepts {wider[0]}-byte accesses, wider than the register ({self.width} bytes)"
                )

    def accepts(self, offset: int, size: int, *, write: bool) -> bool:
        """Whether the register's size policy takes this access (one that overlaps the register)."""
        return self.sizes is None or (offset == self.offset and self.sizes.accepts(size, write=write))

    @property
    def end(self) -> int:
        return self.offset + self.width

    def access_masks(self) -> dict[Access, int]:
        """Bit masks per access type, covering every bit of the register."""
        full = (1 << (8 * self.width)) - 1
        masks = dict.fromkeys(Access, 0)
        claimed = 0
        for f in self.fields:
            masks[f.access] |= f.mask
            claimed |= f.mask
        masks[self.access] |= full & ~claimed
        return masks

    def field(self, name: str) -> Field:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(f"register {self.name} has no field {name}")


ReadHook = Callable[[Any], "int | Awaitable[int]"]
WriteHook = Callable[[Any, int], "None | Awaitable[None]"]
BoundReadHook = Callable[[], "int | Awaitable[int]"]
BoundWriteHook = Callable[[int], "None | Awaitable[None]"]


def apply_write(masks: dict[Access, int], old: int, written: int, byte_mask: int) -> int:
    """The register's value after ``written`` lands on the bytes in ``byte_mask``."""
    w = written & byte_mask
    new = old
    rw = (masks[Access.RW] | masks[Access.WO]) & byte_mask
    new = (new & ~rw) | (w & rw)
    new &= ~(w & masks[Access.RW1C])
    new |= w & masks[Access.W1S]
    return new


async def call_hook(hook: Callable[..., Any], *args: Any) -> Any:
    """Call a plain or ``async`` hook; await only when it returned an awaitable."""
    result = hook(*args)
    if inspect.isawaitable(result):
        result = await result
    return result


def _integer(name: str, value: object) -> int:
    """``value``, which a register named ``name`` is to hold: an integer, or a clear error."""
    if not isinstance(value, int):
        raise TypeError(f"register {name!r} holds an integer, not {type(value).__name__} {value!r}")
    return value


class RegisterFile:
    """The live values of a set of registers, and access dispatch over them.

    The hooks are bound methods of the device instance.
    """

    def __init__(
        self,
        registers: Sequence[Register],
        read_hooks: dict[str, BoundReadHook],
        write_hooks: dict[str, BoundWriteHook],
    ) -> None:
        self.registers = sorted(registers, key=lambda r: r.offset)
        for before, after in zip(self.registers, self.registers[1:]):
            if after.offset < before.end:
                raise ValueError(f"registers {before.name} and {after.name} overlap")
        self.by_name = {r.name: r for r in self.registers}
        self._masks = {r.name: r.access_masks() for r in self.registers}
        self._full = {r.name: (1 << (8 * r.width)) - 1 for r in self.registers}
        #: What a read returns of each register's value: every bit but the write-only ones.
        self._readable = {r.name: self._full[r.name] & ~self._masks[r.name][Access.WO] for r in self.registers}
        self.read_hooks = read_hooks
        self.write_hooks = write_hooks
        self.values = {r.name: r.reset for r in self.registers}

    def reset(self) -> None:
        """Every register but the sticky ones back to its reset value."""
        for register in self.registers:
            if not register.sticky:
                self.values[register.name] = register.reset

    def overlapping(self, offset: int, size: int) -> Iterable[Register]:
        end = offset + size
        return (r for r in self.registers if r.offset < end and offset < r.end)

    def covers(self, offset: int, size: int) -> bool:
        """Whether any register overlaps the access (else it is unimplemented space)."""
        return any(True for _ in self.overlapping(offset, size))

    def __getitem__(self, name: str) -> int:
        return self.values[self._register(name).name]

    def __setitem__(self, name: str, value: int) -> None:
        """Device-side update: no access semantics, no hooks; the value wraps to the register's width."""
        register = self._register(name)
        self.values[name] = _integer(name, value) & ((1 << (8 * register.width)) - 1)

    def whole_reader(self, register: Register) -> Callable[[], int]:
        """A function reading one whole register as :meth:`read` would, for a plain read hook or none.

        Everything it needs is looked up once, here: it is what a device's
        busiest accesses run (see :meth:`Device.quick_read <vdev.model.device.Device.quick_read>`).
        """
        values, name, full, readable = (
            self.values,
            register.name,
            self._full[register.name],
            self._readable[register.name],
        )
        hook = self.read_hooks.get(name)
        if hook is None:
            return lambda: values[name] & readable

        def read() -> int:
            value = values[name] = _integer(name, hook()) & full
            return value & readable

        return read

    def whole_async_reader(self, register: Register) -> Callable[[], Awaitable[int]]:
        """:meth:`whole_reader` for an ``async`` read hook: the same read, awaiting the hook."""
        values, name, full, readable = (
            self.values,
            register.name,
            self._full[register.name],
            self._readable[register.name],
        )
        hook = cast(Callable[[], Awaitable[int]], self.read_hooks[name])

        async def read() -> int:
            value = values[name] = _integer(name, await hook()) & full
            return value & readable

        return read

    def whole_writer(self, register: Register) -> Callable[[int], None]:
        """A function writing one whole register as :meth:`write` would, for a plain write hook or none."""
        values, name, masks, full = self.values, register.name, self._masks[register.name], self._full[register.name]
        hook = self.write_hooks.get(name)

        def write(value: int) -> None:
            new = values[name] = apply_write(masks, values[name], value & full, full)
            if hook is not None:
                hook(new)

        return write

    def whole_async_writer(self, register: Register) -> Callable[[int], Awaitable[None]]:
        """:meth:`whole_writer` for an ``async`` write hook: the same write, awaiting the hook."""
        values, name, masks, full = self.values, register.name, self._masks[register.name], self._full[register.name]
        hook = cast(Callable[[int], Awaitable[None]], self.write_hooks[name])

        async def write(value: int) -> None:
            new = values[name] = apply_write(masks, values[name], value & full, full)
            await hook(new)

        return write

    def _register(self, name: str) -> Register:
        try:
            return self.by_name[name]
        except KeyError:
            known = ", ".join(self.by_name) or "none"
            raise KeyError(f"no register {name!r} here (registers: {known})") from None

    def refusing(self, offset: int, size: int, *, write: bool) -> Register | None:
        """The first register whose size policy refuses this access, if any does."""
        for register in self.overlapping(offset, size):
            if not register.accepts(offset, size, write=write):
                return register
        return None

    def _refuse(self, register: Register, offset: int, size: int, *, write: bool) -> int:
        assert register.sizes is not None
        what = f"at {offset:#x} to register {register.name!r} at {register.offset:#x}"
        return register.sizes.refuse(size, write=write, what=what)

    async def read(self, offset: int, size: int) -> int:
        """Read ``size`` bytes at ``offset`` as a little-endian integer."""
        refusing = self.refusing(offset, size, write=False)
        if refusing is not None:
            return self._refuse(refusing, offset, size, write=False)
        result = 0
        for register in self.overlapping(offset, size):
            hook = self.read_hooks.get(register.name)
            if hook is not None:
                self[register.name] = await call_hook(hook)
            value = self.values[register.name] & self._readable[register.name]
            shift = (register.offset - offset) * 8
            result |= value << shift if shift >= 0 else value >> -shift
        return result & ((1 << (8 * size)) - 1)

    async def write(self, offset: int, size: int, value: int) -> None:
        """Write ``size`` bytes of ``value`` at ``offset`` with each register's semantics."""
        refusing = self.refusing(offset, size, write=True)
        if refusing is not None:
            self._refuse(refusing, offset, size, write=True)
            return
        for register in self.overlapping(offset, size):
            shift = (register.offset - offset) * 8
            full = self._full[register.name]
            if register.sizes is not None and register.sizes.zero_extend:
                written, covered = value, full  # accepted, so it starts at the register
            elif shift >= 0:
                written = value >> shift
                covered = ((1 << (8 * size)) - 1) >> shift
            else:
                written = value << -shift
                covered = ((1 << (8 * size)) - 1) << -shift
            old = self.values[register.name]
            new = apply_write(self._masks[register.name], old, written & full, covered & full)
            self.values[register.name] = new
            hook = self.write_hooks.get(register.name)
            if hook is not None:
                await call_hook(hook, new)
