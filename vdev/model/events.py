"""The device's event log: what happened to a device, in order.

Every observable thing — a config write, a COMMAND transition, a region
access, an interrupt, a DMA mapping, a reset — becomes one event, an
instance of a small frozen class per kind with typed fields (as h11's
events are): tests assert on the log (``events.of_kind(RegionWrite)``),
``--trace`` writes it as JSON lines, and tasks can wait for the next event of
a kind.  Times are ``time.monotonic()`` so that traces from several devices
in one process interleave correctly.

A trace line is ``{"kind": …, "device": …, "t": …, <the event's fields>}``;
``kind`` is the class's :attr:`DeviceEvent.kind`, which several classes may
share when they are variants of one thing (every :class:`Violation` is
``"violation"``).

A device records kinds of its own by subclassing :class:`DeviceEvent`::

    @dataclass(frozen=True, slots=True, kw_only=True)
    class Gpio(DeviceEvent):
        kind: ClassVar[str] = "gpio"
        line: int
        value: int

    self.events.record(Gpio(line=3, value=1))

Field values are what JSON can hold (numbers, strings, booleans, None, and
lists or mappings of them), or the trace cannot be written.

Trapped accesses (:class:`RegionRead`, :class:`RegionWrite`) are the one kind
a busy device produces per message, so they are recorded only while someone
wants them: a listener (``--trace``, :meth:`EventLog.subscribe`,
:meth:`EventLog.wait_for`) or :attr:`EventLog.keep_accesses`, which
:func:`vdev.testing.served` turns on because tests read the log afterwards.
Otherwise an access costs the log one attribute test: the device tests
:attr:`EventLog.accesses_wanted` before it builds the event at all.

Events are recorded by whichever thread serves the device (see
:mod:`vdev.runtime.context`), always under the device's lock, so listeners
run in that thread too.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any, ClassVar, TypeVar

import trio

if TYPE_CHECKING:
    from vdev.model.faults import DeviceFault


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceEvent:
    """One thing that happened to a device; subclasses say what, with typed fields.

    ``t`` is stamped when the event is made and left out of comparisons, so
    two runs' logs compare equal when the same things happened.
    """

    #: The trace's name for this kind of event.
    kind: ClassVar[str]
    t: float = field(default_factory=time.monotonic, compare=False)

    def fields(self) -> dict[str, Any]:
        """The event's own fields (not ``kind`` or ``t``), as a trace line carries them."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "t"}

    def to_json(self, device: str) -> str:
        """One trace line: ``kind``, ``device``, ``t`` and the event's own fields."""
        return json.dumps({"kind": self.kind, "device": device, "t": self.t, **self.fields()})


E = TypeVar("E", bound=DeviceEvent)


@dataclass(frozen=True, slots=True, kw_only=True)
class ConfigWrite(DeviceEvent):
    """The client wrote config space (``value`` as written, before the device's masks)."""

    kind: ClassVar[str] = "config_write"
    offset: int
    size: int
    value: int


@dataclass(frozen=True, slots=True, kw_only=True)
class CommandChange(DeviceEvent):
    """The COMMAND register changed; ``source`` is ``client``, ``device`` or ``reset``.

    The decoded bits are those of the new value.
    """

    kind: ClassVar[str] = "command"
    old: int
    new: int
    source: str
    memory: bool
    io: bool
    master: bool
    serr: bool
    intx_disable: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class RegionRead(DeviceEvent):
    """The client read a BAR (recorded only while accesses are wanted).

    ``value`` is an integer for register-sized accesses (up to 8 bytes) and
    hex text for larger ones.
    """

    kind: ClassVar[str] = "region_read"
    region: int
    offset: int
    size: int
    value: int | str


@dataclass(frozen=True, slots=True, kw_only=True)
class RegionWrite(DeviceEvent):
    """The client wrote a BAR (recorded only while accesses are wanted); ``value`` as for :class:`RegionRead`."""

    kind: ClassVar[str] = "region_write"
    region: int
    offset: int
    size: int
    value: int | str


@dataclass(frozen=True, slots=True, kw_only=True)
class Irq(DeviceEvent):
    """An interrupt: sent (``connected`` says whether a client was there to get it), or held pending.

    ``type`` is ``intx``, ``msi``, ``msix``, ``err`` or ``req``; ``held`` says
    why an MSI-X message was set pending instead of sent.
    """

    kind: ClassVar[str] = "irq"
    type: str
    vector: int
    connected: bool = True
    held: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class DmaMap(DeviceEvent):
    """The client mapped memory for DMA; ``mapped`` when the server can touch it directly."""

    kind: ClassVar[str] = "dma_map"
    iova: int
    size: int
    mapped: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class DmaUnmap(DeviceEvent):
    """A DMA mapping went away (unmapped, or its client did)."""

    kind: ClassVar[str] = "dma_unmap"
    iova: int
    size: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Reset(DeviceEvent):
    """The device was reset; ``reason`` is a :class:`vdev.ResetKind` value."""

    kind: ClassVar[str] = "reset"
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Quiesce(DeviceEvent):
    """The client asked the device to quiesce: started (``done`` False) or finished.

    ``error`` is the errno the client is answered with when the device's
    quiesce hook failed, 0 otherwise.
    """

    kind: ClassVar[str] = "quiesce"
    done: bool
    error: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class MemoryAction(DeviceEvent):
    """A BAR's mapped areas followed memory decoding (see docs/memory-enable.md).

    ``action`` is the :class:`vdev.DisabledMapping` policy applied when
    decoding went off (``saved_bytes`` kept), or ``restore`` when it came back
    (with the :class:`vdev.Prefault` policy).
    """

    kind: ClassVar[str] = "memory"
    bar: int
    action: str
    saved_bytes: int | None = None
    prefault: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class PowerChange(DeviceEvent):
    """The PCI power state in PMCSR changed (0 = D0, 3 = D3hot); ``source`` is ``client`` or ``reset``.

    Out of D0 a device decodes no memory, so its BARs' memory-enable
    policies follow this as they follow COMMAND.MEM (see docs/memory-enable.md).
    """

    kind: ClassVar[str] = "power"
    old: int
    new: int
    source: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Connect(DeviceEvent):
    """A client attached."""

    kind: ClassVar[str] = "connect"


@dataclass(frozen=True, slots=True, kw_only=True)
class Disconnect(DeviceEvent):
    """The client went away."""

    kind: ClassVar[str] = "disconnect"


@dataclass(frozen=True, slots=True, kw_only=True)
class HandlerError(DeviceEvent):
    """Device code raised: an access handler (``region``, ``offset``, ``size``) or a background ``task``.

    The client's access fails; the device goes on being served.
    """

    kind: ClassVar[str] = "handler_error"
    error: str
    region: int | None = None
    offset: int | None = None
    size: int | None = None
    task: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Violation(DeviceEvent):
    """The client (or the device's own rules) broke a rule and was refused; ``what`` says which.

    Violations the framework detects have their own subclasses with the
    details; a device reports its own with this class and a ``detail`` line,
    or a subclass of it.
    """

    kind: ClassVar[str] = "violation"
    what: str
    detail: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class DmaRefused(Violation):
    """A DMA the device tried was refused (not a bus master, unmapped memory, no client)."""

    what: str = "dma"
    direction: str
    address: int
    size: int


@dataclass(frozen=True, slots=True, kw_only=True)
class AccessWhileDisabled(Violation):
    """A BAR access arrived while its decoding was off (COMMAND's bit clear, or the device out of D0);
    ``policy`` says what was done."""

    what: str = "access while disabled"
    region: int
    offset: int
    size: int
    access: str
    policy: str


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerRefused(Violation):
    """A peer connected whose credentials the server does not accept."""

    what: str = "peer not allowed"
    uid: int
    pid: int


@dataclass(frozen=True, slots=True, kw_only=True)
class NegotiationTimeout(Violation):
    """A peer connected and sent no VERSION in time."""

    what: str = "no VERSION in time"
    seconds: float


@dataclass(frozen=True, slots=True, kw_only=True)
class FaultInjected(DeviceEvent):
    """The device's fault plan injected ``fault`` at ``at`` (region and offset, vector, DMA range…)."""

    kind: ClassVar[str] = "fault"
    fault: DeviceFault
    at: Mapping[str, Any] = field(default_factory=dict)

    def fields(self) -> dict[str, Any]:
        """Where, then what the rule injected, flat as trace lines have them."""
        return {**self.at, **self.fault.describe()}


class EventLog:
    """An append-only, bounded list of events with listeners.

    Bounded because a long-running server must not grow without limit; the
    trace file (if any) still receives every event.
    """

    def __init__(self, device: str, limit: int = 100_000) -> None:
        self.device = device
        self._events: list[DeviceEvent] = []
        self._limit = limit
        self._listeners: list[Callable[[DeviceEvent], None]] = []
        self._keep_accesses = False
        #: Whether trapped accesses are being recorded (a listener, or :attr:`keep_accesses`).
        #: The device tests this before building an access event at all.
        self.accesses_wanted = False

    @property
    def keep_accesses(self) -> bool:
        """Record trapped accesses even when nobody listens (tests that read the log afterwards)."""
        return self._keep_accesses

    @keep_accesses.setter
    def keep_accesses(self, keep: bool) -> None:
        self._keep_accesses = keep
        self.accesses_wanted = keep or bool(self._listeners)

    def record(self, event: E) -> E:
        """Append ``event`` and tell every listener."""
        self._events.append(event)
        if len(self._events) > self._limit:
            del self._events[: self._limit // 10]
        if self._listeners:
            for listener in list(self._listeners):
                listener(event)
        return event

    def subscribe(self, listener: Callable[[DeviceEvent], None]) -> Callable[[], None]:
        """Call ``listener`` for every future event; returns the unsubscribe function.

        The listener runs in the thread that records the event, under the
        device's lock: it must not block, and it reaches Trio only through
        a :class:`trio.lowlevel.TrioToken`.
        """
        self._listeners.append(listener)
        self.accesses_wanted = True

        def unsubscribe() -> None:
            self._listeners.remove(listener)
            self.accesses_wanted = self._keep_accesses or bool(self._listeners)

        return unsubscribe

    def write_to(self, stream: IO[str]) -> Callable[[], None]:
        """Write every future event to ``stream`` as a JSON line (``--trace``)."""

        def write(event: DeviceEvent) -> None:
            stream.write(event.to_json(self.device) + "\n")
            stream.flush()

        return self.subscribe(write)

    async def wait_for(self, kind: type[E], *, count: int = 1) -> E:
        """Sleep until at least ``count`` events of class ``kind`` have been recorded; return the last one.

        Counts what is still in the log (see :meth:`clear`); wrap it in
        :func:`trio.fail_after` for a deadline.
        """
        arrived = trio.Event()
        token, trio_thread = trio.lowlevel.current_trio_token(), threading.get_ident()

        def check(event: DeviceEvent) -> None:
            if isinstance(event, kind) and len(self.of_kind(kind)) >= count:
                if threading.get_ident() == trio_thread:
                    arrived.set()
                else:
                    token.run_sync_soon(arrived.set)

        unsubscribe = self.subscribe(check)
        try:
            if len(self.of_kind(kind)) < count:
                await arrived.wait()
        finally:
            unsubscribe()
        return self.of_kind(kind)[-1]

    def of_kind(self, *kinds: type[E]) -> list[E]:
        """The recorded events of the given classes (subclasses included), oldest first."""
        return [event for event in self._events if isinstance(event, kinds)]

    def clear(self) -> None:
        """Forget recorded events (listeners stay)."""
        self._events.clear()

    def __iter__(self) -> Iterator[DeviceEvent]:
        return iter(list(self._events))

    def __len__(self) -> int:
        return len(self._events)
