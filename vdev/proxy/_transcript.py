# Rules of this module:
#
# * A transcript is JSON lines, one object per message, in the order the
#   proxy received them (both directions interleaved, all connections):
#
#     {"index": 7, "connection": 0, "time": 0.0123, "direction": "to_client",
#      "command": "REGION_READ", "type": "RegionReadReply",
#      "header": {"msg_id": 5, "command": 9, "size": 36, "flags": 1, "error": 0},
#      "payload": {"region": 0, "offset": 0, "data": "4f4c4548"},
#      "fds": [], "raw": "0500090024000000..."}
#
# * ``payload`` holds the typed message's fields (not the framing ones:
#   command, msg_id, fds, no_reply) with bytes as hex, flags as integers and
#   nested structures as objects.  It is ``null`` when the payload did not
#   decode, and then ``error`` says why.  It is for people and for comparing.
# * ``raw`` is the whole frame as hex.  Replay sends the client's frames from
#   ``raw``, so a recorded session is reproduced byte for byte, malformed
#   messages included.
# * ``fds`` describes each passed fd by kind and size (``_fds.FdInfo``).
# * ``time`` is seconds since the connection was accepted.  ``faults`` lists
#   the faults injected into the message; the record itself is always the
#   message as its sender sent it.
# * Bytes the proxy could not frame are recorded with ``"unframed": true``,
#   ``raw`` and ``fds`` only.
"""Transcripts: every message of a session as a JSON line."""

from __future__ import annotations

import dataclasses
import enum
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from vdev.protocol import Command, Header, Message, as_command
from vdev.proxy._fds import FdInfo, describe_fd
from vdev.proxy._framing import Frame, Unframed
from vdev.proxy._plan import Direction

#: Message fields that are framing, recorded in ``header``/``fds`` instead.
_FRAMING_FIELDS = frozenset({"command", "msg_id", "fds", "no_reply"})


class TranscriptError(ValueError):
    """A transcript line that is not a message record; names the line."""


def to_json_value(value: Any) -> Any:
    """``value`` as plain JSON: bytes as hex, enums as numbers, dataclasses as objects."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex()
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, enum.Enum):
        return int(value.value) if isinstance(value.value, int) else value.value
    if isinstance(value, (int, float)):
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_json_value(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): to_json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json_value(v) for v in value]
    return repr(value)


def payload_of(message: Message) -> dict[str, Any]:
    """The typed fields of ``message`` that are not framing, as JSON."""
    return {
        f.name: to_json_value(getattr(message, f.name))
        for f in dataclasses.fields(message)
        if f.name not in _FRAMING_FIELDS
    }


def command_name(command: int) -> str | int:
    named = as_command(command)
    return named.name if isinstance(named, Command) else command


@dataclass(frozen=True)
class Record:
    """One message of a transcript."""

    index: int
    connection: int
    time: float
    direction: Direction
    raw: bytes
    fds: tuple[FdInfo, ...] = ()
    #: ``None`` for unframed bytes.
    header: Header | None = None
    #: Class name of the decoded message; ``None`` if it did not decode.
    type: str | None = None
    payload: dict[str, Any] | None = None
    error: str | None = None
    faults: tuple[str, ...] = ()

    @property
    def unframed(self) -> bool:
        return self.header is None

    @property
    def is_reply(self) -> bool:
        return self.header is not None and self.header.is_reply

    @property
    def is_request(self) -> bool:
        return self.header is not None and not self.header.is_reply

    def describe(self) -> str:
        """A short human name: ``REGION_READ reply #5``."""
        if self.header is None:
            return f"unframed bytes ({len(self.raw)})"
        kind = "reply" if self.header.is_reply else "request"
        return f"{command_name(self.header.command)} {kind} #{self.header.msg_id}"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "index": self.index,
            "connection": self.connection,
            "time": round(self.time, 6),
            "direction": self.direction.value,
        }
        if self.header is None:
            out["unframed"] = True
        else:
            out["command"] = command_name(self.header.command)
            out["type"] = self.type
            out["header"] = {
                "msg_id": self.header.msg_id,
                "command": self.header.command,
                "size": self.header.size,
                "flags": self.header.flags,
                "error": self.header.error,
            }
            out["payload"] = self.payload
            if self.error is not None:
                out["error"] = self.error
        out["fds"] = [fd.to_dict() for fd in self.fds]
        if self.faults:
            out["faults"] = list(self.faults)
        out["raw"] = self.raw.hex()
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Record:
        try:
            direction = Direction(data["direction"])
            raw = bytes.fromhex(data["raw"])
            fds = tuple(FdInfo.from_dict(fd) for fd in data.get("fds", []))
            header = None
            if not data.get("unframed"):
                h = data["header"]
                header = Header(
                    msg_id=int(h["msg_id"]),
                    command=int(h["command"]),
                    size=int(h["size"]),
                    flags=int(h["flags"]),
                    error=int(h.get("error", 0)),
                )
            payload = data.get("payload")
            if payload is not None and not isinstance(payload, dict):
                raise ValueError("payload must be an object or null")
            return cls(
                index=int(data["index"]),
                connection=int(data.get("connection", 0)),
                time=float(data.get("time", 0.0)),
                direction=direction,
                raw=raw,
                fds=fds,
                header=header,
                type=data.get("type"),
                payload=payload,
                error=data.get("error"),
                faults=tuple(data.get("faults", ())),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise TranscriptError(f"not a message record ({type(exc).__name__}: {exc})") from None


def frame_record(
    frame: Frame | Unframed,
    *,
    index: int,
    connection: int,
    time: float,
    direction: Direction,
    faults: tuple[str, ...] = (),
) -> Record:
    """The record of a frame (or of unframed bytes); its fds are described, not closed."""
    fds = tuple(describe_fd(fd) for fd in frame.fds)
    if isinstance(frame, Unframed):
        return Record(index=index, connection=connection, time=time, direction=direction, raw=frame.data, fds=fds)
    message = frame.message
    return Record(
        index=index,
        connection=connection,
        time=time,
        direction=direction,
        raw=frame.data,
        fds=fds,
        header=frame.header,
        type=type(message).__name__ if message is not None else None,
        payload=payload_of(message) if message is not None else None,
        error=str(frame.error) if frame.error is not None else None,
        faults=faults,
    )


def read_transcript(lines: Iterable[str], *, source: str = "<transcript>") -> list[Record]:
    """Parse transcript lines (blank lines are skipped)."""
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TranscriptError(f"{source}:{number}: not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise TranscriptError(f"{source}:{number}: not a JSON object")
        try:
            records.append(Record.from_dict(data))
        except TranscriptError as exc:
            raise TranscriptError(f"{source}:{number}: {exc}") from None
    return records


def load_transcript(path: str | os.PathLike[str]) -> list[Record]:
    """Read a transcript file written by ``vdev proxy --record``."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as file:
            return read_transcript(file, source=str(path))
    except OSError as exc:
        raise TranscriptError(f"cannot read transcript {path}: {exc.strerror}") from None


class TranscriptWriter:
    """Writes records as JSON lines, flushing each, so a killed proxy leaves a usable file."""

    def __init__(self, file: IO[str]) -> None:
        self._file = file

    def write(self, record: Record) -> None:
        self._file.write(record.to_json() + "\n")
        self._file.flush()


def by_connection(records: Iterable[Record]) -> Iterator[tuple[int, list[Record]]]:
    """Records grouped per connection, connections in order of their first message."""
    groups: dict[int, list[Record]] = {}
    for record in records:
        groups.setdefault(record.connection, []).append(record)
    yield from groups.items()
