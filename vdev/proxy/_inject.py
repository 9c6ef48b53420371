# Rules of this module:
#
# * No I/O and no clock: a frame and the time go in, the actions to take with
#   it come out (``Send`` some bytes with some fds, possibly later, possibly
#   with fresh fds attached; ``Hangup``).  The proxy shell carries them out.
# * Without a firing rule a frame becomes exactly one ``Send`` of its own
#   bytes and fds.  Rewrites touch only what the fault names (the id, the
#   size field, the length); the rest of the frame stays byte for byte.
# * Counters and the random generator belong to the injector, which the
#   proxy shares between its connections: a rule that fired once does not
#   fire again for the next client, so a test can check that the server
#   still serves one.
# * A reply is matched with the region and offset of the request it answers,
#   which ``RequestTracker`` remembers per connection.
"""Deciding what happens to each message: the sans-IO heart of fault injection."""

from __future__ import annotations

import json
import random
import struct
from dataclasses import dataclass, field
from typing import Any

from vdev.protocol import (
    HEADER_SIZE,
    Command,
    Header,
    Message,
    RegionInfoReply,
    RegionInfoRequest,
    RegionIoFdsReply,
    RegionIoFdsRequest,
    RegionReadReply,
    RegionReadRequest,
    RegionWriteMultiRequest,
    RegionWriteReply,
    RegionWriteRequest,
    as_command,
)
from vdev.proxy._framing import Frame
from vdev.proxy._plan import (
    Close,
    Delay,
    Direction,
    Drop,
    Duplicate,
    ExtraFds,
    FaultRule,
    FdKind,
    MessageKind,
    Oversize,
    Truncate,
    WireFaultPlan,
    WrongId,
)

_MSG_ID = struct.Struct("=H")
_SIZE = struct.Struct("=I")
_SIZE_OFFSET = 4


@dataclass(frozen=True)
class Send:
    """Write ``data`` with ``fds`` to the frame's destination, ``delay`` seconds from now.

    ``attach`` asks for fresh fds of these kinds to be created and sent
    after ``fds``.
    """

    data: bytes
    fds: tuple[int, ...] = ()
    delay: float = 0.0
    attach: tuple[FdKind, ...] = ()


@dataclass(frozen=True)
class Hangup:
    """Close the connections to both peers."""


Action = Send | Hangup


@dataclass(frozen=True)
class InjectedFault:
    """One fault the proxy injected: what, when, to which message."""

    #: Index of the rule in the plan.
    rule: int
    fault: str
    connection: int
    direction: Direction
    command: int
    msg_id: int
    is_reply: bool
    region: int | None
    offset: int | None
    #: Seconds since the epoch, and since the proxy started.
    time: float
    elapsed: float
    #: The fault's parameters as applied (the new id, bytes kept, ...).
    detail: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        command = as_command(self.command)
        return {
            "event": "fault",
            "time": round(self.time, 6),
            "elapsed": round(self.elapsed, 6),
            "connection": self.connection,
            "rule": self.rule,
            "fault": self.fault,
            "direction": self.direction.value,
            "message": "reply" if self.is_reply else "request",
            "command": command.name if isinstance(command, Command) else command,
            "msg_id": self.msg_id,
            "region": self.region,
            "offset": self.offset,
            **self.detail,
        }

    def to_json(self) -> str:
        """One JSON line for the fault log."""
        return json.dumps(self.to_dict(), sort_keys=False)


Span = tuple[int, int | None, int]


def access_spans(message: Message | None) -> list[Span]:
    """The (region, offset, length) a message touches; offset ``None`` for whole-region ones."""
    match message:
        case RegionReadRequest(region=region, offset=offset, count=count):
            return [(region, offset, count)]
        case RegionReadReply(region=region, offset=offset, data=data):
            return [(region, offset, len(data))]
        case RegionWriteRequest(region=region, offset=offset, data=data):
            return [(region, offset, len(data))]
        case RegionWriteReply(region=region, offset=offset, count=count):
            return [(region, offset, count)]
        case RegionWriteMultiRequest(writes=writes):
            return [(w.region, w.offset, len(w.data)) for w in writes]
        case RegionInfoRequest(index=index) | RegionInfoReply(index=index):
            return [(index, None, 0)]
        case RegionIoFdsRequest(index=index) | RegionIoFdsReply(index=index):
            return [(index, None, 0)]
    return []


class RequestTracker:
    """Remembers each connection's outstanding requests so replies can be matched.

    Requests are keyed by direction and message id; a request sent with
    NO_REPLY is not remembered, since nothing will answer it.
    """

    def __init__(self) -> None:
        self._pending: dict[tuple[Direction, int], Message | None] = {}

    def observe(self, direction: Direction, frame: Frame) -> Message | None:
        """Note ``frame``; for a reply, return (and forget) the request it answers."""
        header = frame.header
        if header.is_reply:
            answered = Direction.TO_SERVER if direction is Direction.TO_CLIENT else Direction.TO_CLIENT
            return self._pending.pop((answered, header.msg_id), None)
        if not header.no_reply:
            self._pending[(direction, header.msg_id)] = frame.message
        return None


class FaultInjector:
    """Applies a ``WireFaultPlan`` to the frames passing through a proxy."""

    def __init__(self, plan: WireFaultPlan | None = None) -> None:
        self.plan = plan if plan is not None else WireFaultPlan()
        self._random = random.Random(self.plan.seed)
        self._matched = [0] * len(self.plan.rules)
        self._fired = [0] * len(self.plan.rules)

    def apply(
        self,
        frame: Frame,
        *,
        direction: Direction,
        request: Message | None = None,
        connection: int = 0,
        time: float = 0.0,
        elapsed: float = 0.0,
    ) -> tuple[list[Action], InjectedFault | None]:
        """What to do with ``frame``, and the fault injected into it if any.

        ``request`` is the request a reply answers (``RequestTracker``).
        """
        spans = access_spans(request if frame.header.is_reply and request is not None else frame.message)
        if not spans and frame.header.is_reply:
            spans = access_spans(frame.message)
        chosen: tuple[int, FaultRule, Span | None] | None = None
        for number, rule in enumerate(self.plan.rules):
            matched, span = _matches(rule, frame.header, direction, spans)
            if not matched:
                continue
            self._matched[number] += 1
            if chosen is not None or self._matched[number] < rule.nth:
                continue
            if rule.count is not None and self._fired[number] >= rule.count:
                continue
            if rule.probability < 1.0 and self._random.random() >= rule.probability:
                continue
            self._fired[number] += 1
            chosen = (number, rule, span)
        if chosen is None:
            return [Send(frame.data, frame.fds)], None
        number, rule, span = chosen
        actions, detail = _inflict(rule, frame)
        region, offset = (span[0], span[1]) if span is not None else (None, None)
        injected = InjectedFault(
            rule=number,
            fault=rule.fault.name,
            connection=connection,
            direction=direction,
            command=frame.header.command,
            msg_id=frame.header.msg_id,
            is_reply=frame.header.is_reply,
            region=region,
            offset=offset,
            time=time,
            elapsed=elapsed,
            detail=detail,
        )
        return actions, injected


def _matches(rule: FaultRule, header: Header, direction: Direction, spans: list[Span]) -> tuple[bool, Span | None]:
    if rule.direction is not None and rule.direction is not direction:
        return False, None
    if rule.message is not None and (rule.message is MessageKind.REPLY) != header.is_reply:
        return False, None
    if rule.command is not None and rule.command != header.command:
        return False, None
    if rule.region is None and rule.offset is None:
        return True, spans[0] if spans else None
    for span in spans:
        region, offset, length = span
        if rule.region is not None and rule.region != region:
            continue
        if rule.offset is not None and (offset is None or not offset <= rule.offset < offset + max(length, 1)):
            continue
        return True, span
    return False, None


def _with_msg_id(data: bytes, msg_id: int) -> bytes:
    return _MSG_ID.pack(msg_id) + data[_MSG_ID.size :]


def _with_size(data: bytes, size: int) -> bytes:
    if len(data) < _SIZE_OFFSET + _SIZE.size:
        return data
    return data[:_SIZE_OFFSET] + _SIZE.pack(size & 0xFFFF_FFFF) + data[_SIZE_OFFSET + _SIZE.size :]


def _inflict(rule: FaultRule, frame: Frame) -> tuple[list[Action], dict[str, Any]]:
    data, fds = frame.data, frame.fds
    match rule.fault:
        case Delay(seconds=seconds):
            return [Send(data, fds, delay=seconds)], {"seconds": seconds}
        case Drop():
            return [], {}
        case Duplicate():
            return [Send(data, fds), Send(data, fds)], {}
        case WrongId(msg_id=msg_id):
            new_id = (frame.header.msg_id ^ 0x8000) if msg_id is None else msg_id
            return [Send(_with_msg_id(data, new_id), fds)], {"new_msg_id": new_id}
        case Truncate(keep=keep, resize=resize):
            if keep is None:
                keep = HEADER_SIZE + (len(data) - HEADER_SIZE) // 2
            keep = min(keep, len(data))
            cut = data[:keep]
            resized = resize and keep >= HEADER_SIZE
            if resized:
                cut = _with_size(cut, keep)
            return [Send(cut, fds)], {"keep": keep, "of": len(data), "resize": resized}
        case Oversize(extra=extra):
            grown = _with_size(data, len(data) + extra) + bytes(extra)
            return [Send(grown, fds)], {"extra": extra, "size": len(grown)}
        case ExtraFds(fds=count, kind=kind):
            return [Send(data, fds, attach=(kind,) * count)], {"fds": count, "kind": kind}
        case Close(after=after):
            if after is None:
                after = len(data) // 2
            after = min(after, len(data))
            actions: list[Action] = [Send(data[:after], fds)] if after else []
            return [*actions, Hangup()], {"after": after, "of": len(data)}
    raise AssertionError(f"unknown fault {rule.fault!r}")
