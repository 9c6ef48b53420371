"""The device's event log: what happened to a device, in order.

Every observable thing — a config write, a COMMAND transition, a region
access, an interrupt, a DMA mapping, a reset — becomes one :class:`Event`.
Tests assert on the log, ``--trace`` writes it as JSON lines, and tasks can
wait for the next event of a kind.  Times are ``time.monotonic()`` so that
traces from several devices in one process interleave correctly.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

import trio

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
        "connect",
        "disconnect",
        "handler_error",
        "violation",
        "gpio",
    }
)


@dataclass(frozen=True)
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

    def record(self, kind: str, **data: Any) -> Event:
        """Append an event and tell every listener."""
        event = Event(kind=kind, device=self.device, t=time.monotonic(), data=data)
        self._events.append(event)
        if len(self._events) > self._limit:
            del self._events[: self._limit // 10]
        for listener in list(self._listeners):
            listener(event)
        return event

    def subscribe(self, listener: Callable[[Event], None]) -> Callable[[], None]:
        """Call ``listener`` for every future event; returns the unsubscribe function."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

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

        def check(event: Event) -> None:
            if event.kind == kind and len(self.of_kind(kind)) >= count:
                arrived.set()

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
