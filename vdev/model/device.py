"""The device class a vdev user subclasses.

A device is described by class attributes — identity, capabilities, BARs
(:class:`~vdev.model.bars.Bar` attributes named ``bar0``…``bar5``) and
parameters — and holds its live state per instance.  It knows nothing about
sockets or libvfio-user: the runtime calls :meth:`Device.region_read`,
:meth:`Device.region_write` and the ``*_event`` methods, and gives it an
interrupt sink and a DMA port while a client is connected.

Device code needs no locks of its own: the runtime holds the device's
:attr:`Device.lock` whenever device code runs — around each handler, in
whichever thread serves it, and around every step of the device's own Trio
tasks (:meth:`Device.run`, :meth:`Device.start_soon`).  A handler may run
outside the Trio thread, so what it asks of Trio (starting a task, waking
a waiter) is passed to the Trio thread here rather than done in place.
"""

from __future__ import annotations

import enum
import inspect
import logging
import threading
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any, ClassVar, Generic, NamedTuple, TypeVar, overload

import trio

from vdev.model.bars import Bar, BarState
from vdev.model.capabilities import Capability, MsiX, PciExpress, PowerManagement
from vdev.model.config import CommandRegister, ConfigChange, ConfigSpace, PlacedCapability
from vdev.model.dma import Dma, DmaPort
from vdev.model.errors import DefinitionError
from vdev.model.events import (
    AccessWhileDisabled,
    CommandChange,
    ConfigWrite,
    Connect,
    Disconnect,
    EventLog,
    FaultInjected,
    HandlerError,
    PowerChange,
    RegionRead,
    RegionWrite,
    Reset,
)
from vdev.model.faults import DeviceFault, DeviceFaultPlan, InjectedError
from vdev.model.interrupts import Interrupts, IrqSink
from vdev.model.memory_enable import BarDisabledError, CommandControl, DisabledAccess
from vdev.model.pci_regs import PCI_COMMAND, PCI_COMMAND_IO, PCI_COMMAND_MEMORY, PCI_D0, PCI_D3HOT
from vdev.model.registers import Register, call_hook
from vdev.protocol.constants import RegionIndex

T = TypeVar("T")
log = logging.getLogger("vdev")

#: Identity attributes and how many bits config space has for each.
_IDENTITY_BITS = {
    "vendor_id": 16,
    "device_id": 16,
    "subsystem_vendor_id": 16,
    "subsystem_id": 16,
    "revision": 8,
    "class_code": 24,
}


def _declared_bars(cls: type) -> list[Bar]:
    """The BARs declared as class attributes of ``cls`` and its bases (a subclass's win)."""
    found: dict[str, Bar] = {}
    for klass in reversed(cls.__mro__):
        for name, value in vars(klass).items():
            if isinstance(value, Bar):
                found[name] = value
    return list(found.values())


class ResetKind(enum.Enum):
    """Why a device is being reset; the three are distinct events."""

    DEVICE = "device"
    FLR = "flr"
    LOST_CONNECTION = "lost_connection"


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _boolean(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered not in _TRUE + _FALSE:
        raise ValueError(f"expected a boolean ({'/'.join(_TRUE)} or {'/'.join(_FALSE)}), got {text!r}")
    return lowered in _TRUE


def _integer(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise ValueError(f"expected an integer (42, 0x2a, 0o52 or 0b101010), got {text!r}") from None


def _real(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"expected a number (0.5, 1e-3), got {text!r}") from None


def _text(text: str) -> str:
    return text


#: The converter of a parameter whose default has this type and that names no ``parser``.
_CONVERTERS: dict[type, Callable[[str], Any]] = {bool: _boolean, int: _integer, float: _real, str: _text}


class Param(Generic[T]):
    """A device parameter the CLI exposes as ``--param name=value``, typed by its default.

    ``Param(8)`` is a ``Param[int]``: on a device instance the attribute is
    the value, an ``int`` to the type checker, so device code uses
    ``self.queues`` as it is.  The converter from the command line's text is
    ``parser`` if given (it decides the type: ``Param(128 * MiB,
    parser=parse_size)``), else the one for the default's type: ``bool``
    (true/false, yes/no, on/off, 1/0), ``int`` (decimal or 0x/0o/0b), ``float``
    or ``str``; any other default needs a ``parser``.
    """

    def __init__(self, default: T, help: str = "", parser: Callable[[str], T] | None = None) -> None:
        self.default = default
        self.help = help
        self.name = ""
        if parser is None:
            parser = _CONVERTERS.get(type(default))
            if parser is None:
                raise DefinitionError(
                    f"Param({default!r}): a {type(default).__name__} parameter needs a parser= from text"
                )
        self.parser: Callable[[str], T] = parser

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, instance: None, owner: type) -> Param[T]: ...

    @overload
    def __get__(self, instance: object, owner: type) -> T: ...

    def __get__(self, instance: object, owner: type) -> Param[T] | T:
        if instance is None:
            return self
        value: T = instance.params[self.name]  # type: ignore[attr-defined]
        return value

    def __repr__(self) -> str:
        return f"Param({self.default!r}, help={self.help!r})"

    def parse(self, text: str) -> T:
        """Convert a command-line string to the parameter's type (a ValueError says what was expected)."""
        return self.parser(text)

    def accepts(self, value: object) -> bool:
        """Whether ``value``, given from Python rather than parsed, has the parameter's type.

        Only a parameter without its own parser can tell (the parser decides
        its type); an ``int`` is a fine ``float``, as everywhere in Python.
        """
        kind = type(self.default)
        if kind not in _CONVERTERS:
            return True
        return isinstance(value, kind) or (kind is float and isinstance(value, int))


class _Lane(NamedTuple):
    """How one whole-register access is served without the general path (see :meth:`Device._quick_lanes`)."""

    #: The register's whole reader or writer (a coroutine function when ``is_async``).
    function: Callable[..., Any]
    #: The COMMAND bit its BAR decodes on.
    decode_bit: int
    is_async: bool


class Device:
    """Base class of every vdev device.  Subclass it and set the identity attributes."""

    vendor_id: ClassVar[int] = 0
    device_id: ClassVar[int] = 0
    subsystem_vendor_id: ClassVar[int] = 0
    subsystem_id: ClassVar[int] = 0
    revision: ClassVar[int] = 0
    class_code: ClassVar[int] = 0xFF0000
    express: ClassVar[bool] = False
    intx: ClassVar[bool] = True
    rom_size: ClassVar[int] = 0

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Check the declaration as soon as the class exists: identity, BARs, registers, hooks."""
        super().__init_subclass__(**kwargs)
        for attribute, bits in _IDENTITY_BITS.items():
            value = getattr(cls, attribute)
            if not isinstance(value, int) or not 0 <= value < 1 << bits:
                raise DefinitionError(f"{cls.__name__}.{attribute} = {value!r} does not fit in {bits} bits")
        for bar in _declared_bars(cls):
            bar.check(cls.__name__)

    def __init__(self, name: str | None = None, **params: Any) -> None:
        self.name = name or type(self).__name__.lower()
        #: Held by whoever runs device code (see the module docstring); re-entrant.
        self.lock = threading.RLock()
        self.params = self._resolve_params(params)
        self.events = EventLog(self.name)
        capabilities = self.capabilities()
        self._bar_specs = self.bar_specs()
        self._check_layout(capabilities)
        self.config = ConfigSpace(
            vendor_id=self.vendor_id,
            device_id=self.device_id,
            subsystem_vendor_id=self.subsystem_vendor_id,
            subsystem_id=self.subsystem_id,
            revision=self.revision,
            class_code=self.class_code,
            express=self.express,
            bars=self._bar_specs,
            rom_size=self.rom_size,
            interrupt_pin=1 if self.intx else 0,
            capabilities=capabilities,
            registers=self.config_registers(),
        )
        self._bars = {spec.index: BarState(spec, self) for spec in self._bar_specs if spec.index is not None}
        for spec in self._bar_specs:
            # The state where ``self.barN`` finds it first, past the class's descriptor:
            # handlers reach their registers through it on every access.
            if spec.attribute is not None and spec.index is not None:
                self.__dict__[spec.attribute] = self._bars[spec.index]
        self.rom = bytearray(self.rom_size)
        self.irq = Interrupts(self)
        self.dma = Dma(self)
        self.command_control = CommandControl(self)
        self._faults = DeviceFaultPlan()
        self._command_changed = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._trio_token: trio.lowlevel.TrioToken | None = None
        self._trio_thread: int | None = None
        self._msix = self.config.find(MsiX)
        self._pm = self.config.find(PowerManagement)
        self._power_state = PCI_D0
        #: Whether the BARs' memory-enable policies last saw memory decoding on (COMMAND.MEM in D0).
        self._memory_decoding = self.command.memory
        self._quick_reads, self._quick_writes = self._quick_lanes()

    # -- declaration hooks -----------------------------------------------------

    def capabilities(self) -> Sequence[Capability]:
        """The capability list, in chain order.  Override to declare capabilities."""
        return []

    def config_registers(self) -> Sequence[Register]:
        """Device-specific config registers at fixed offsets, outside any capability.  Default: none.

        Real devices keep error and control registers there (an ioat DMA
        engine's channel error register lives at 0x180); RO, RW and RW1C bits
        are supported.
        """
        return []

    def bar_specs(self) -> list[Bar]:
        """The BARs: by default those declared on the class (and its bases), by index.

        Override it to build BARs from parameters (a size, say); call the
        base implementation for the declared ones.
        """
        found = {bar.index: bar for bar in _declared_bars(type(self)) if bar.index is not None}
        return [found[i] for i in sorted(found)]

    @classmethod
    def param_specs(cls) -> dict[str, Param[Any]]:
        found: dict[str, Param[Any]] = {}
        for klass in reversed(cls.__mro__):
            for name, value in vars(klass).items():
                if isinstance(value, Param):
                    found[name] = value
        return found

    def _resolve_params(self, given: dict[str, Any]) -> dict[str, Any]:
        """Defaults, overridden by ``given``: text is parsed, anything else must have the parameter's type."""
        owner = type(self).__name__
        specs = self.param_specs()
        unknown = set(given) - set(specs)
        if unknown:
            raise TypeError(f"{owner} has no parameter {', '.join(sorted(unknown))}")
        values = {name: spec.default for name, spec in specs.items()}
        for name, value in given.items():
            spec = specs[name]
            if isinstance(value, str):
                try:
                    value = spec.parse(value)
                except ValueError as exc:
                    raise ValueError(f"{owner}: bad value for parameter {name}={value!r}: {exc}") from None
            elif not spec.accepts(value):
                expected = type(spec.default).__name__
                raise TypeError(f"{owner}: parameter {name} is {expected}, not {type(value).__name__} {value!r}")
            values[name] = value
        return values

    def _check_layout(self, capabilities: Sequence[Capability]) -> None:
        """Check what only an instance knows: BARs built from parameters, and where MSI-X lives."""
        owner = type(self).__name__
        bars: dict[int, Bar] = {}
        for spec in self._bar_specs:
            spec.check(owner)
            assert spec.index is not None
            if spec.index in bars:
                raise DefinitionError(f"{owner}: two BARs with index {spec.index}")
            bars[spec.index] = spec
        for cap in capabilities:
            if not isinstance(cap, MsiX):
                continue
            table = (cap.table_bar, cap.table_offset, cap.table_size, "table")
            pba = (cap.pba_bar, cap.pba_offset, cap.pba_size, "PBA")
            for index, offset, size, what in (table, pba):
                where = f"{owner}: MSI-X {what} at BAR{index}+{offset:#x} ({size} bytes)"
                bar = bars.get(index)
                if bar is None:
                    raise DefinitionError(f"{where}: the device declares no BAR{index}")
                if offset + size > bar.size:
                    raise DefinitionError(f"{where} ends beyond BAR{index} ({bar.size:#x} bytes)")
                for overlapped in bar.overlaps(offset, size):
                    raise DefinitionError(f"{where} overlaps {overlapped}")
            if cap.table_bar == cap.pba_bar and (
                cap.table_offset < cap.pba_offset + cap.pba_size and cap.pba_offset < cap.table_offset + cap.table_size
            ):
                raise DefinitionError(
                    f"{owner}: MSI-X table at BAR{cap.table_bar}+{cap.table_offset:#x} ({cap.table_size} bytes)"
                    f" and PBA at +{cap.pba_offset:#x} ({cap.pba_size} bytes) overlap"
                )

    # -- state -------------------------------------------------------------------

    @property
    def faults(self) -> DeviceFaultPlan:
        """Faults to inject (see :mod:`vdev.model.faults`); empty by default."""
        return self._faults

    @faults.setter
    def faults(self, plan: DeviceFaultPlan) -> None:
        if not isinstance(plan, DeviceFaultPlan):
            raise TypeError(f"{self.name}: faults must be a DeviceFaultPlan, not {type(plan).__name__}")
        self._faults = plan

    def bar(self, index: int) -> BarState:
        return self._bars[index]

    def bars(self) -> Iterator[BarState]:
        return iter(self._bars.values())

    @property
    def command(self) -> CommandRegister:
        """The COMMAND register as the client last wrote it."""
        return self.config.command

    @property
    def power_state(self) -> int:
        """The PCI power state in PMCSR (0 = D0, 3 = D3hot); always D0 without a Power Management capability."""
        return self._power_state

    def decodes(self, bit: str) -> bool:
        """Whether the BARs ``bit`` (``memory`` or ``io``) enables answer now.

        Like hardware, a function out of D0 decodes neither memory nor I/O,
        whatever COMMAND says: D3hot gets the same treatment as MEM off.
        """
        return self._power_state == PCI_D0 and bool(getattr(self.command, bit))

    async def wait_for_command(self, predicate: Callable[[CommandRegister], bool]) -> CommandRegister:
        """Sleep until COMMAND satisfies ``predicate`` (e.g. ``lambda c: c.memory``)."""
        while True:
            with self.lock:
                command = self.command
                if predicate(command):
                    return command
                changed = self._command_changed
            await changed.wait()

    def call_soon(self, function: Callable[..., Any], *args: Any) -> None:
        """Call ``function`` on the Trio thread: now if this is it, else as soon as Trio gets to it.

        How a handler, which may run in another thread, sets a ``trio.Event``
        or cancels a scope its device's tasks wait in.
        """
        if self._trio_token is None or threading.get_ident() == self._trio_thread:
            function(*args)
        else:
            self._trio_token.run_sync_soon(function, *args)

    def start_soon(self, function: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Start background work (an engine, a timer) as a Trio task owned by the device.

        The task lives as long as the device is served; handlers use this to
        finish work later and raise an interrupt, the way hardware does.
        """
        if self._nursery is None:
            raise RuntimeError(f"{self.name} is not being served; it cannot start background work")
        self.call_soon(self._nursery.start_soon, self._guarded, function, *args)

    async def _guarded(self, function: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """A failing background task is logged and recorded; the device keeps being served."""
        try:
            await function(*args)
        except Exception as exc:
            log.exception("%s: background task %s failed", self.name, getattr(function, "__name__", function))
            self.events.record(HandlerError(task=getattr(function, "__name__", repr(function)), error=repr(exc)))

    def attach_nursery(self, nursery: trio.Nursery | None) -> None:
        """The runtime gives the device the nursery its tasks live in (None when it stops).

        Called on the Trio thread, which is where :meth:`start_soon` and
        wake-ups are sent from handlers running elsewhere.
        """
        self._nursery = nursery
        if nursery is None:
            self._trio_token = self._trio_thread = None
        else:
            self._trio_token, self._trio_thread = trio.lowlevel.current_trio_token(), threading.get_ident()

    def attach_client(self, sink: IrqSink, port: DmaPort) -> None:
        """A client attached: deliverable interrupts go to ``sink``, DMA to ``port``.

        The runtime calls this with its libvfio-user context; the test
        bench (:mod:`vdev.testing.bench`) with its recorder and memory.
        """
        self.irq.sink = sink
        self.dma.port = port
        self.events.record(Connect())

    def detach_client(self) -> None:
        """The client went away: its eventfds, interrupt masks and DMA path went with it."""
        self.irq.sink = None
        self.irq.client_gone()
        self.dma.port = None
        self.events.record(Disconnect())

    # -- overridable behaviour ----------------------------------------------------

    async def run(self) -> None:
        """Background work of the device, started when it is served.  Default: none."""

    def on_reset(self, kind: ResetKind) -> Awaitable[None] | None:
        """Called after the framework reset its state for ``kind``; may be ``async``.  Default: nothing more."""

    def on_quiesce(self) -> None:
        """Stop touching client memory; may be ``async``.

        Called before the client changes what the device may access (DMA
        map or unmap, device reset); the client's request waits until this
        returns.  Override it only if the device has DMA in flight — a
        device that does not override it is quiesced immediately.
        """

    def on_command(self, old: CommandRegister, new: CommandRegister) -> None:
        """Called after each change of COMMAND.  Default: nothing."""

    # -- entry points for the runtime ---------------------------------------------

    def _quick_lanes(self) -> tuple[dict[tuple[int, int, int], _Lane], dict[tuple[int, int, int], _Lane]]:
        """The accesses served on a quick lane: (region, offset, size) -> lane.

        A lane is the register's reader or writer, its BAR's COMMAND decode
        bit, and whether the reader or writer is ``async`` (its hook is).
        A register qualifies unless it lies in the MSI-X table or PBA
        (which the device answers itself); a read or write lane exists only
        if the size policies (the BAR's, the register's) accept the
        whole-register access, so a refused access always takes the general
        path.  Registers never lie in mapped areas, and a register always
        wins over the BAR's raw handlers, so nothing else can claim such an
        access.
        """
        reserved: dict[int, list[range]] = {}
        if self._msix is not None:
            cap: MsiX = self._msix.capability  # type: ignore[assignment]
            reserved.setdefault(cap.table_bar, []).append(range(cap.table_offset, cap.table_offset + cap.table_size))
            reserved.setdefault(cap.pba_bar, []).append(range(cap.pba_offset, cap.pba_offset + cap.pba_size))
        reads: dict[tuple[int, int, int], _Lane] = {}
        writes: dict[tuple[int, int, int], _Lane] = {}
        for index, bar in self._bars.items():
            registers = bar.registers
            bit = PCI_COMMAND_IO if bar.decoding_bit == "io" else PCI_COMMAND_MEMORY
            for register in registers.registers:
                if any(area.start < register.end and register.offset < area.stop for area in reserved.get(index, ())):
                    continue
                place = (index, register.offset, register.width)
                if bar.accepts(register.offset, register.width, write=False):
                    if inspect.iscoroutinefunction(registers.read_hooks.get(register.name)):
                        reads[place] = _Lane(registers.whole_async_reader(register), bit, True)
                    else:
                        reads[place] = _Lane(registers.whole_reader(register), bit, False)
                if bar.accepts(register.offset, register.width, write=True):
                    if inspect.iscoroutinefunction(registers.write_hooks.get(register.name)):
                        writes[place] = _Lane(registers.whole_async_writer(register), bit, True)
                    else:
                        writes[place] = _Lane(registers.whole_writer(register), bit, False)
        return reads, writes

    def _open_lane(self, lane: _Lane | None, kind: str) -> bool:
        """Whether ``lane`` may serve this access now: it exists, its BAR decodes, and nothing watches closer.

        Nothing watches closer when no fault rule is about this kind of
        access and no schedule counts accesses; the lane then behaves
        exactly as the general path would.
        """
        return not (
            lane is None
            or not self.config.data[PCI_COMMAND] & lane.decode_bit
            or self._power_state != PCI_D0
            or kind in self.faults.kinds
            or self.command_control.access_schedule is not None
        )

    def quick_read(self, region: int, offset: int, size: int) -> int | None:
        """Answer the common read right here, without coroutines: the value, or None for "use :meth:`region_read`".

        The common read is one whole register with a plain hook or none, on
        an open lane (see :meth:`_quick_lanes` and :meth:`_open_lane`); it
        behaves exactly as :meth:`region_read` would.  The value is an
        integer, not bytes, so that the runtime can store it straight into
        the library's buffer.  It is what keeps a plain handler's access near
        the cost of the C library serving it.
        """
        lane = self._quick_reads.get((region, offset, size))
        if (  # _open_lane, inline: this is the busiest path there is
            lane is None
            or lane.is_async
            or not self.config.data[PCI_COMMAND] & lane.decode_bit
            or self._power_state != PCI_D0
            or "read" in self.faults.kinds
            or self.command_control.access_schedule is not None
        ):
            return None
        self.command_control.accesses += 1
        value: int = lane.function()
        if self.events.accesses_wanted:
            self.events.record(RegionRead(region=region, offset=offset, size=size, value=value))
        return value

    def quick_write(self, region: int, offset: int, size: int, value: int) -> bool:
        """Apply the common write of ``value`` right here (see :meth:`quick_read`).

        False means "use :meth:`region_write`".
        """
        lane = self._quick_writes.get((region, offset, size))
        if (  # _open_lane, inline (see quick_read)
            lane is None
            or lane.is_async
            or not self.config.data[PCI_COMMAND] & lane.decode_bit
            or self._power_state != PCI_D0
            or "write" in self.faults.kinds
            or self.command_control.access_schedule is not None
        ):
            return False
        self.command_control.accesses += 1
        if self.events.accesses_wanted:
            self.events.record(RegionWrite(region=region, offset=offset, size=size, value=value))
        lane.function(value)
        return True

    async def region_read(self, region: int, offset: int, size: int) -> bytes:
        """Answer a client read of ``size`` bytes at ``offset`` in ``region``.

        A whole register with an ``async`` hook is read on its quick lane
        when that lane is open, as :meth:`quick_read` does for plain hooks.
        """
        lane = self._quick_reads.get((region, offset, size))
        if lane is not None and lane.is_async and self._open_lane(lane, "read"):
            self.command_control.accesses += 1
            value: int = await lane.function()
            if self.events.accesses_wanted:
                self.events.record(RegionRead(region=region, offset=offset, size=size, value=value))
            return value.to_bytes(size, "little")
        if region == RegionIndex.CONFIG:
            return self.config.read(offset, size)
        if region == RegionIndex.ROM:
            return bytes(self.rom[offset : offset + size]).ljust(size, b"\xff")
        fault = await self._inject("read", region, offset)
        data = await self._bar_access(region, offset, size, None)
        if fault is not None and fault.action == "corrupt":
            corrupted = int.from_bytes(data, "little") ^ (fault.xor & ((1 << (8 * size)) - 1))
            data = corrupted.to_bytes(size, "little")
        if self.events.accesses_wanted:
            self.events.record(RegionRead(region=region, offset=offset, size=size, value=_as_int(data)))
        return data

    async def region_write(self, region: int, offset: int, data: bytes) -> None:
        """Apply a client write of ``data`` at ``offset`` in ``region`` (on an ``async`` quick lane if open)."""
        lane = self._quick_writes.get((region, offset, len(data)))
        if lane is not None and lane.is_async and self._open_lane(lane, "write"):
            self.command_control.accesses += 1
            value = int.from_bytes(data, "little")
            if self.events.accesses_wanted:
                self.events.record(RegionWrite(region=region, offset=offset, size=len(data), value=value))
            await lane.function(value)
            return
        if region == RegionIndex.CONFIG:
            await self._config_write(offset, data)
            return
        if region == RegionIndex.ROM:
            return
        fault = await self._inject("write", region, offset)
        if self.events.accesses_wanted:
            self.events.record(RegionWrite(region=region, offset=offset, size=len(data), value=_as_int(data)))
        if fault is not None and fault.action == "drop":
            return
        await self._bar_access(region, offset, len(data), data)

    async def _inject(self, on: str, region: int, offset: int) -> DeviceFault | None:
        """Apply the plan's fault for this access, if one matches; corrupt is the caller's to apply."""
        fault = self.faults.pick(on, region=region, offset=offset)
        if fault is None:
            return None
        self.events.record(FaultInjected(fault=fault, at={"region": region, "offset": offset}))
        if fault.action == "delay":
            await trio.sleep(fault.seconds)
        elif fault.action == "errno":
            raise InjectedError(fault.errno, f"{on} of {self.describe(region, offset)}")
        elif fault.action == "err":
            self.irq.report_error()
        elif fault.action == "req":
            self.irq.request_release()
        return fault

    async def _bar_access(self, region: int, offset: int, size: int, data: bytes | None) -> bytes:
        bar = self._bars[region]
        self.command_control.count_access()
        if not self.decodes(bar.decoding_bit):
            policy = bar.when_disabled
            if policy is not DisabledAccess.PASS:
                self.events.record(
                    AccessWhileDisabled(
                        region=region,
                        offset=offset,
                        size=size,
                        access="write" if data is not None else "read",
                        policy=policy.value,
                    )
                )
                if policy is DisabledAccess.ERROR:
                    raise BarDisabledError(f"BAR{region} {bar.decoding_bit} decoding is disabled")
                return b"\xff" * size if data is None else b""
        if self._msix is not None:
            cap: MsiX = self._msix.capability  # type: ignore[assignment]
            if region == cap.table_bar and cap.table_offset <= offset < cap.table_offset + cap.table_size:
                if data is None:
                    return self.irq.read_msix_table(offset - cap.table_offset, size)
                self.irq.write_msix_table(offset - cap.table_offset, data)
                return b""
            if region == cap.pba_bar and cap.pba_offset <= offset < cap.pba_offset + cap.pba_size:
                return self.irq.read_msix_pba(offset - cap.pba_offset, size) if data is None else b""
        if data is None:
            return await bar.read(offset, size)
        await bar.write(offset, data)
        return b""

    async def _config_write(self, offset: int, data: bytes) -> None:
        change = self.config.write(offset, data)
        self.events.record(ConfigWrite(offset=offset, size=len(data), value=change.value))
        if self.command_control.held_mask:
            self.config.write_int(PCI_COMMAND, 2, self.command_control.apply_holds(self.command.value))
        if change.old_command != self.command:
            self.command_changed(change.old_command, source="client")
        await self._capability_writes(change)

    def command_changed(self, old: CommandRegister, *, source: str) -> None:
        """The one path every COMMAND transition takes, from the client or the device.

        Records the event, applies the BARs' memory-enable policies (so a
        ``populate`` is complete before the client's write is answered),
        wakes :meth:`wait_for_command` and calls :meth:`on_command`.
        """
        new = self.command
        self.events.record(CommandChange(old=old.value, new=new.value, source=source, **new.decoded()))
        self._apply_memory_decoding()
        changed, self._command_changed = self._command_changed, trio.Event()
        self.call_soon(changed.set)
        self.on_command(old, new)
        if old.intx_disable and not new.intx_disable:
            self.irq.intx_unmasked()

    def _apply_memory_decoding(self) -> None:
        """Run the BARs' memory-enable policies when memory decoding (COMMAND.MEM in D0) changed."""
        decoding = self.decodes("memory")
        if decoding == self._memory_decoding:
            return
        self._memory_decoding = decoding
        for bar in self._bars.values():
            if bar.decoding_bit == "memory":
                bar.memory_enabled() if decoding else bar.memory_disabled()

    def _stored_power_state(self, pm: PlacedCapability) -> int:
        """The power state PMCSR holds now."""
        pmcsr = pm.register("pmcsr")
        return pmcsr.field("power_state").extract(self.config.read_int(pmcsr.offset, pmcsr.width))

    def _power_written(self, pm: PlacedCapability) -> None:
        """A client wrote PMCSR: move to the state written, or keep the current one if it is one we lack.

        The capability advertises D0 and D3hot only (no D1, D2), and a
        function ignores a write of a state it does not support.
        """
        state = self._stored_power_state(pm)
        if state not in (PCI_D0, PCI_D3HOT):
            pmcsr = pm.register("pmcsr")
            field = pmcsr.field("power_state")
            stored = self.config.read_int(pmcsr.offset, pmcsr.width)
            self.config.write_int(pmcsr.offset, pmcsr.width, (stored & ~field.mask) | self._power_state << field.lsb)
            return
        self._set_power_state(state, source="client")

    def _set_power_state(self, state: int, *, source: str) -> None:
        old, self._power_state = self._power_state, state
        if old != state:
            self.events.record(PowerChange(old=old, new=state, source=source))
            self._apply_memory_decoding()

    async def _capability_writes(self, change: ConfigChange) -> None:
        for placed in change.capabilities:
            if isinstance(placed.capability, PowerManagement):
                pmcsr = placed.register("pmcsr")
                if change.offset < pmcsr.end and pmcsr.offset < change.offset + change.size:
                    self._power_written(placed)
            if isinstance(placed.capability, PciExpress) and placed.capability.flr:
                # Initiate-FLR is write-only (never stored), so look at what was written.
                control = placed.register("device_control")
                if change.written(control) & control.field("initiate_flr").mask:
                    await self.reset(ResetKind.FLR)
        self.irq.deliver_unmasked_pending()

    async def reset(self, kind: ResetKind) -> None:
        """Reset for ``kind``: device reset and FLR restore power-on state; a lost
        connection keeps the device's state (a new client may pick it up) and
        drops only what belonged to the old client."""
        if kind is not ResetKind.LOST_CONNECTION:
            fault = self.faults.pick("reset")
            if fault is not None:
                self.events.record(FaultInjected(fault=fault, at={"reason": kind.value}))
                raise InjectedError(fault.errno, f"{kind.value} reset")
        old_command = self.command
        if kind is ResetKind.LOST_CONNECTION:
            self.dma.clear()
        else:
            self.config.reset()
            for bar in self._bars.values():
                bar.reset()
            self.irq.reset()
        self.events.record(Reset(reason=kind.value))
        if self._pm is not None:
            self._set_power_state(self._stored_power_state(self._pm), source="reset")
        if old_command != self.command:
            self.command_changed(old_command, source="reset")
        await call_hook(self.on_reset, kind)

    def describe(self, region: int, offset: int) -> str:
        """A human name for a location, e.g. ``BAR0+0x4 (scratch)``, for logs.

        Reads only the class's declarations, so any thread may call it.
        """
        if region == RegionIndex.CONFIG:
            return f"config+{offset:#x}"
        if region == RegionIndex.ROM:
            return f"ROM+{offset:#x}"
        where = f"BAR{region}+{offset:#x}"
        bar = self._bars.get(region)
        if bar is not None:
            names = [r.name for r in bar.registers.overlapping(offset, 1)]
            if names:
                where += f" ({names[0]})"
        return where

    def close(self) -> None:
        """Release the memfds behind mapped areas."""
        for bar in self._bars.values():
            bar.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} {self.vendor_id:04x}:{self.device_id:04x}>"


def _as_int(data: bytes) -> int | str:
    """A trace-friendly value: an integer for register-sized data, hex otherwise."""
    return int.from_bytes(data, "little") if len(data) <= 8 else data.hex()
