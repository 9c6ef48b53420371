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
from typing import Any

from vdev.model.errors import DefinitionError


class Access(enum.Enum):
    """How a register bit responds to reads and writes."""

    RO = "ro"
    RW = "rw"
    RW1C = "rw1c"
    W1S = "w1s"
    WO = "wo"


RO, RW, RW1C, W1S, WO = Access.RO, Access.RW, Access.RW1C, Access.W1S, Access.WO


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
    register's own access type.  A ``sticky`` register keeps its value
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

    def whole_writer(self, register: Register) -> Callable[[int], None]:
        """A function writing one whole register as :meth:`write` would, for a plain write hook or none."""
        values, name, masks, full = self.values, register.name, self._masks[register.name], self._full[register.name]
        hook = self.write_hooks.get(name)

        def write(value: int) -> None:
            new = values[name] = apply_write(masks, values[name], value & full, full)
            if hook is not None:
                hook(new)

        return write

    def _register(self, name: str) -> Register:
        try:
            return self.by_name[name]
        except KeyError:
            known = ", ".join(self.by_name) or "none"
            raise KeyError(f"no register {name!r} here (registers: {known})") from None

    async def read(self, offset: int, size: int) -> int:
        """Read ``size`` bytes at ``offset`` as a little-endian integer."""
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
        for register in self.overlapping(offset, size):
            shift = (register.offset - offset) * 8
            full = self._full[register.name]
            if shift >= 0:
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
