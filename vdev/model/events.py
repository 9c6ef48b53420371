"""The device's event log: what happened to a device, in order.

Every observable thing — a config write, a COMMAND transition, a region
access, an interrupt, a DMA mapping, a reset — becomes one :class:`Event`.
Tests assert on the log, ``--trace`` writes it as JSON lines, and tasks can
wait for the next event of a kind.  Times are ``time.monotonic()`` so that
traces from several devices in one process interleave correctly.

Trapped accesses (``region_read``, ``region_write``) are the one kind a
busy device produces per message, so they are recorded only while someone
wants them: a listener (``--trace``, :meth:`EventLog.subscribe`,
:meth:`EventLog.wait_for`) or :attr:`EventLog.keep_accesses`, which
:func:`vdev.testing.served` turns on because tests read the log afterwards.
Otherwise an access costs the log one attribute test.

Events are recorded by whichever thread serves the device (see
:mod:`vdev.runtime.context`), always under the device's lock, so listeners
run in that thread too.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

import trio

#: The kinds recorded per trapped access, only while someone wants them.
ACCESS_KINDS = frozenset({"region_read", "region_write"})
#: The event kinds a trace may contain.
KINDS = frozenset(
    {
        "config_write",
        "command",
        "region_read",
        "region_write",
        "irq",
        "dma_map",
        "dma_unmap",
        "reset",
        "quiesce",
        "memory",
        "power",
        "connect",
        "disconnect",
        "handler_error",
        "violation",
        "gpio",
        "nvme",
    }
)


@dataclass(frozen=True, slots=True)
class Event:
    """One thing that happened to a device."""

    kind: str
    device: str
    t: float
    data: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        """One trace line: ``kind``, ``device``, ``t`` and the event's own fields."""
        return json.dumps({"kind": self.kind, "device": self.device, "t": self.t, **self.data})


class EventLog:
    """An append-only, bounded list of events with listeners.

    Bounded because a long-running server must not grow without limit; the
    trace file (if any) still receives every event.
    """

    def __init__(self, device: str, limit: int = 100_000) -> None:
        self.device = device
        self._events: list[Event] = []
        self._limit = limit
        self._listeners: list[Callable[[Event], None]] = []
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

    def record(self, kind: str, **data: Any) -> Event:
        """Append an event and tell every listener."""
        event = Event(kind, self.device, time.monotonic(), data)
        self._events.append(event)
        if len(self._events) > self._limit:
            del self._events[: self._limit // 10]
        if self._listeners:
            for listener in list(self._listeners):
                listener(event)
        return event

    def subscribe(self, listener: Callable[[Event], None]) -> Callable[[], None]:
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

        def write(event: Event) -> None:
            stream.write(event.to_json() + "\n")
            stream.flush()

        return self.subscribe(write)

    async def wait_for(self, kind: str, *, count: int = 1) -> Event:
        """Sleep until at least ``count`` events of ``kind`` have been recorded; return the last one.

        Counts what is still in the log (see :meth:`clear`); wrap it in
        :func:`trio.fail_after` for a deadline.
        """
        arrived = trio.Event()
        token, trio_thread = trio.lowlevel.current_trio_token(), threading.get_ident()

        def check(event: Event) -> None:
            if event.kind == kind and len(self.of_kind(kind)) >= count:
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

    def of_kind(self, *kinds: str) -> list[Event]:
        """The recorded events of the given kinds, oldest first."""
        return [event for event in self._events if event.kind in kinds]

    def clear(self) -> None:
        """Forget recorded events (listeners stay)."""
        self._events.clear()

    def __iter__(self) -> Iterator[Event]:
        return iter(list(self._events))

    def __len__(self) -> int:
        return len(self._events)
