"""Replay: play a transcript's client side against a server and compare the answers.

How a recorded session is reproduced, per recorded connection in turn:

* The client's requests are sent from the transcript's ``raw`` bytes, so
  message ids, reserved bits and malformed frames are exactly as recorded.
  Their fds are recreated by kind: a memfd of the recorded size (DMA_MAP's
  guest memory), an eventfd (SET_IRQS), one end of a socket pair, ...
  With ``pace`` each request waits for its recorded time, for devices whose
  answers depend on how much time passed (a DMA engine that takes 100 ms).
* The server's replies are compared, in order, with the recorded ones.
* Requests the server makes (DMA_READ/DMA_WRITE) are answered by the
  replayer from recreated memory: the DMA_MAP regions of the session.  A
  DMA_READ first gets the data the recorded client answered with, so the
  device reads what it read when the session was recorded.  The recorded
  client's answers are not sent, since the replayer makes its own.

What is compared, and what is not (see ``compare_records``):

* Compared: the message type, the header's msg_id, command, flags and
  error, every decoded payload field, and the number and kinds of fds.
* Not compared: the header's size (it follows from the payload), the
  recorded time, fd sizes (a server may back a region with a larger
  file), and the msg_id of requests the server makes (a server numbers
  them from a counter that earlier clients may have advanced).
* Any other field can be left out with ``ignore`` patterns (fnmatch on
  the field path, optionally limited to a command: ``REGION_READ:payload.data``).

The first difference ends the replay and is reported as a ``Divergence``.
Unframed bytes (see ``FrameReader``) from the client are sent as recorded;
at unframed bytes from the server, comparing that connection stops.
"""

from __future__ import annotations

import json
import math
import mmap
import os
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from errno import EFAULT, EINVAL
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import trio
import trio.lowlevel

from vdev.protocol import (
    HEADER_SIZE,
    NEED_DATA,
    ConnectionClosed,
    DmaMapRequest,
    DmaReadReply,
    DmaReadRequest,
    DmaUnmapRequest,
    DmaWriteReply,
    DmaWriteRequest,
    ErrorReply,
    Header,
    Message,
    RegionIndex,
    RegionWriteRequest,
    RemoteProtocolError,
    Reply,
    Request,
    decode_message,
)
from vdev.proxy._fds import close_fds, create_fd
from vdev.proxy._framing import FrameReader
from vdev.proxy._plan import Direction
from vdev.proxy._transcript import Record, by_connection, command_name, frame_record, load_transcript
from vdev.transport import FdStream

#: Seconds to wait for each expected message unless told otherwise.
DEFAULT_TIMEOUT = 5.0


class _Missing:
    def __repr__(self) -> str:
        return "(absent)"


#: Stands for a field one side has and the other has not.
MISSING: Any = _Missing()


@dataclass(frozen=True)
class Divergence:
    """The first place where the server answered differently from the recording."""

    #: Index (the transcript's ``index``) of the recorded message that differs.
    index: int
    connection: int
    #: The recorded message, e.g. ``REGION_READ reply #12``.
    message: str
    #: Dotted path of the field, e.g. ``payload.data``; ``message`` when a
    #: whole message was missing or unexpected.
    field: str
    expected: Any
    got: Any
    #: What probably explains it, when the replay can tell (or empty).
    hint: str = ""

    def __str__(self) -> str:
        where = f"message {self.index} ({self.message}, connection {self.connection}): {self.field}"
        window = _byte_window(self.expected, self.got)
        if window is not None:
            offset, length, expected, got = window
            what = f"{where}: byte {offset:#x} of {length}: expected {expected}, got {got}"
        else:
            what = f"{where}: expected {_show(self.expected)}, got {_show(self.got)}"
        return f"{what} ({self.hint})" if self.hint else what


#: Byte strings up to this long are shown whole; longer ones from their first difference.
_SHOWN_BYTES = 16


def _byte_window(expected: Any, got: Any) -> tuple[int, int, str, str] | None:
    """For long hex byte strings: the first differing byte, the length, and both sides from there.

    A 256-byte config read shown whole is 512 hex digits that hide where
    they differ; this names the offset and shows :data:`_SHOWN_BYTES`.
    """
    if not (isinstance(expected, str) and isinstance(got, str)):
        return None
    try:
        want, have = bytes.fromhex(expected), bytes.fromhex(got)
    except ValueError:
        return None
    if max(len(want), len(have)) <= _SHOWN_BYTES:
        return None
    offset = next((i for i, (a, b) in enumerate(zip(want, have)) if a != b), min(len(want), len(have)))
    end = offset + _SHOWN_BYTES
    return offset, len(want), f'"{want[offset:end].hex()}…"', f'"{have[offset:end].hex()}…"'


def _show(value: Any) -> str:
    """JSON for values; notes in parentheses, such as ``(absent)``, as they are."""
    if value is MISSING:
        return "(absent)"
    if isinstance(value, str) and value.startswith("("):
        return value
    return json.dumps(value)


@dataclass(frozen=True)
class ReplayResult:
    """What a replay did and the divergence that stopped it, if any."""

    divergence: Divergence | None
    #: Client messages sent and server messages compared.
    sent: int
    compared: int
    connections: int

    @property
    def ok(self) -> bool:
        return self.divergence is None


# --- comparison (no I/O) ---------------------------------------------------------------


def _ignorer(patterns: Sequence[str], command: str) -> Callable[[str], bool]:
    scoped = []
    for pattern in patterns:
        scope, sep, rest = pattern.partition(":")
        if sep and scope.strip().upper() != command:
            continue
        scoped.append(rest if sep else pattern)
    return lambda path: any(fnmatchcase(path, pattern) for pattern in scoped)


def _first_difference(
    path: str, expected: Any, got: Any, ignored: Callable[[str], bool]
) -> tuple[str, Any, Any] | None:
    if ignored(path):
        return None
    if isinstance(expected, dict) and isinstance(got, dict):
        for key in [*expected, *(k for k in got if k not in expected)]:
            difference = _first_difference(f"{path}.{key}", expected.get(key, MISSING), got.get(key, MISSING), ignored)
            if difference is not None:
                return difference
        return None
    if isinstance(expected, list) and isinstance(got, list):
        for i in range(max(len(expected), len(got))):
            difference = _first_difference(
                f"{path}[{i}]",
                expected[i] if i < len(expected) else MISSING,
                got[i] if i < len(got) else MISSING,
                ignored,
            )
            if difference is not None:
                return difference
        return None
    if type(expected) is not type(got) or expected != got:
        return path, expected, got
    return None


def compare_records(expected: Record, got: Record, *, ignore: Sequence[str] = ()) -> tuple[str, Any, Any] | None:
    """The first field in which ``got`` differs from ``expected``: (path, expected, got).

    ``None`` when they agree on everything compared (see the module's
    docstring for what is and is not).
    """
    command = str(command_name(expected.header.command)) if expected.header is not None else ""
    ignored = _ignorer(ignore, command)
    if expected.header is None or got.header is None:
        return _first_difference("raw", expected.raw.hex(), got.raw.hex(), ignored)
    checks: list[tuple[str, Any, Any]] = [("type", expected.type, got.type)]
    server_request = expected.direction is Direction.TO_CLIENT and expected.is_request
    if not server_request:
        checks.append(("header.msg_id", expected.header.msg_id, got.header.msg_id))
    checks += [
        ("header.command", expected.header.command, got.header.command),
        ("header.flags", expected.header.flags, got.header.flags),
        ("header.error", expected.header.error, got.header.error),
    ]
    if expected.payload is not None and got.payload is not None:
        checks.append(("payload", expected.payload, got.payload))
    else:
        checks += [("error", expected.error, got.error), ("raw", expected.raw.hex(), got.raw.hex())]
    checks.append(("fds", [fd.kind for fd in expected.fds], [fd.kind for fd in got.fds]))
    for path, want, have in checks:
        difference = _first_difference(path, want, have, ignored)
        if difference is not None:
            return difference
    return None


def _decode(record: Record) -> Message | None:
    """The message a record holds, decoded from its raw bytes (``None`` if it cannot be)."""
    if record.header is None or len(record.raw) < HEADER_SIZE:
        return None
    try:
        return decode_message(Header.decode(record.raw), record.raw[HEADER_SIZE : record.header.size])
    except RemoteProtocolError:
        return None


# --- recreated client memory ---------------------------------------------------------------


class _DmaMemory:
    """The DMA regions of a replayed session, backed by the recreated fds or by private memory."""

    def __init__(self) -> None:
        self._regions: list[tuple[int, int, mmap.mmap | bytearray]] = []

    def map(self, request: DmaMapRequest, fd: int | None) -> None:
        memory: mmap.mmap | bytearray
        try:
            if fd is None:
                raise OSError("no fd")
            memory = mmap.mmap(fd, request.size, offset=request.offset)
        except (OSError, ValueError, OverflowError):
            memory = bytearray(request.size)
        self._regions.append((request.address, request.size, memory))

    def unmap(self, address: int, size: int) -> None:
        for region in list(self._regions):
            if region[0] == address and region[1] == size:
                self._regions.remove(region)
                if isinstance(region[2], mmap.mmap):
                    region[2].close()

    def _find(self, address: int, count: int) -> tuple[int, mmap.mmap | bytearray] | None:
        for start, size, memory in self._regions:
            if start <= address and address + count <= start + size:
                return address - start, memory
        return None

    def read(self, address: int, count: int) -> bytes | None:
        found = self._find(address, count)
        if found is None:
            return None
        offset, memory = found
        return bytes(memory[offset : offset + count])

    def write(self, address: int, data: bytes) -> bool:
        found = self._find(address, len(data))
        if found is None:
            return False
        offset, memory = found
        memory[offset : offset + len(data)] = data
        return True

    def close(self) -> None:
        for _start, _size, memory in self._regions:
            if isinstance(memory, mmap.mmap):
                memory.close()
        self._regions.clear()

    def answer(self, request: Message) -> Reply:
        """The client's answer to a server request, from this memory."""
        match request:
            case DmaReadRequest(address=address, count=count):
                data = self.read(address, count)
                if data is not None:
                    return DmaReadReply(msg_id=request.msg_id, address=address, data=data)
            case DmaWriteRequest(address=address, data=data):
                if self.write(address, data):
                    return DmaWriteReply(msg_id=request.msg_id, address=address, count=len(data))
            case _:
                return ErrorReply(command=request.command, msg_id=request.msg_id, errno=EINVAL)
        return ErrorReply(command=request.command, msg_id=request.msg_id, errno=EFAULT)


# --- the replayer ----------------------------------------------------------------------------


class _Diverged(Exception):
    def __init__(self, divergence: Divergence) -> None:
        super().__init__(str(divergence))
        self.divergence = divergence


class _ConnectionReplay:
    """One recorded connection played against the server."""

    def __init__(
        self,
        records: list[Record],
        socket_path: Path,
        *,
        timeout: float,
        ignore: Sequence[str],
        pace: bool,
        patience: float,
    ) -> None:
        self.records = records
        self.socket_path = socket_path
        self.timeout = timeout
        self.ignore = ignore
        self.pace = pace
        self.patience = patience
        self.connection = records[0].connection
        self.sent = 0
        self.compared = 0
        self._memory = _DmaMemory()
        self._owned: list[int] = []
        self._replies_in, self._replies_out = trio.open_memory_channel[Record | None](math.inf)
        # The server's requests, expected in recorded order, with the client's recorded answers.
        self._expected_requests: deque[Record] = deque(
            r for r in records if r.direction is Direction.TO_CLIENT and r.is_request
        )
        #: For each recorded server request, how many server requests precede it, itself included.
        self._request_positions = {r.index: n for n, r in enumerate(self._expected_requests, start=1)}
        self._served = 0
        self._served_changed = trio.Event()
        self._recorded_answers: dict[int, Record] = {}
        for position, record in enumerate(records):
            if record.direction is Direction.TO_CLIENT and record.is_request and record.header is not None:
                for later in records[position + 1 :]:
                    if later.direction is Direction.TO_SERVER and later.is_reply and later.header is not None:
                        if later.header.msg_id == record.header.msg_id:
                            self._recorded_answers[record.index] = later
                            break
        self._failure: Divergence | None = None
        # Whether this replay has written config space yet: a config read that
        # differs before that means the server did not start where the recording did.
        self._config_written = False
        self._stream: FdStream | None = None
        self._send_lock = trio.Lock()
        self._start = 0.0

    async def run(self) -> Divergence | None:
        self._stream = await FdStream.connect(self.socket_path, patience=self.patience)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._receive_loop, nursery.cancel_scope)
                try:
                    await self._drive()
                except _Diverged as exc:
                    self._failure = self._failure or exc.divergence
                nursery.cancel_scope.cancel()
        finally:
            self._stream.close()
            self._memory.close()
            close_fds(self._owned)
        return self._failure

    def _diverged(self, record: Record, field: str, expected: Any, got: Any) -> _Diverged:
        hint = ""
        if record.type == "RegionReadReply" and (record.payload or {}).get("region") == RegionIndex.CONFIG:
            if not self._config_written:
                hint = (
                    "config space differed before this replay wrote any: the server did not start where the"
                    " recording did; a server keeps device state between clients, as hardware does, so replay"
                    " against a freshly started one"
                )
        return _Diverged(Divergence(record.index, self.connection, record.describe(), field, expected, got, hint))

    async def _drive(self) -> None:
        self._start = trio.current_time()
        last = self.records[-1]
        for record in self.records:
            if self._failure is not None:
                return
            if record.direction is Direction.TO_SERVER:
                if record.is_reply:
                    continue  # the replayer answers the server's requests itself
                if self.pace:
                    await trio.sleep_until(self._start + record.time)
                await self._send_request(record)
            elif record.unframed:
                return  # the recorded server lost the framing: nothing after it can be compared
            elif record.is_request:
                await self._wait_served(record)
            else:
                await self._expect(record)
        # Anything else the server has already said is more than the recording has.
        await trio.lowlevel.checkpoint()
        try:
            extra = self._replies_out.receive_nowait()
        except trio.WouldBlock:
            return
        if extra is not None:
            raise self._diverged(last, "message", "(end of the recorded connection)", extra.describe())

    async def _send_request(self, record: Record) -> None:
        fds: list[int] = []
        for info in record.fds:
            fd, keep = create_fd(info)
            fds.append(fd)
            self._owned.extend((fd, *keep))
        message = _decode(record)
        if isinstance(message, RegionWriteRequest) and message.region == RegionIndex.CONFIG:
            self._config_written = True
        if isinstance(message, DmaMapRequest):
            self._memory.map(message, fds[0] if fds else None)
        elif isinstance(message, DmaUnmapRequest):
            self._memory.unmap(message.address, message.size)
        await self._write(record, record.raw, fds)
        self.sent += 1

    async def _write(self, record: Record, data: bytes, fds: Sequence[int] = ()) -> None:
        """Send ``data`` for ``record``; a server that hung up is a divergence there."""
        assert self._stream is not None
        async with self._send_lock:
            try:
                await self._stream.send(data, fds)
            except OSError as exc:
                raise self._diverged(record, "message", record.describe(), f"(cannot send: {exc.strerror})") from None

    async def _expect(self, record: Record) -> None:
        got: Record | None = None
        with trio.move_on_after(self.timeout) as waiting:
            got = await self._replies_out.receive()
        if waiting.cancelled_caught:
            raise self._diverged(record, "message", record.describe(), f"(nothing within {self.timeout:g} s)")
        if got is None:
            raise self._diverged(record, "message", record.describe(), "(the server closed the connection)")
        self.compared += 1
        difference = compare_records(record, got, ignore=self.ignore)
        if difference is not None:
            raise self._diverged(record, *difference)

    async def _wait_served(self, record: Record) -> None:
        position = self._request_positions[record.index]
        with trio.move_on_after(self.timeout):
            while self._served < position and self._failure is None:
                await self._served_changed.wait()
            return
        if self._failure is None:
            raise self._diverged(record, "message", record.describe(), f"(nothing within {self.timeout:g} s)")

    async def _receive_loop(self, scope: trio.CancelScope) -> None:
        assert self._stream is not None
        reader = FrameReader()
        try:
            while True:
                data, fds = await self._stream.receive()
                reader.receive_data(data, fds)
                while (item := reader.next_frame()) is not NEED_DATA:
                    if isinstance(item, ConnectionClosed):
                        await self._replies_in.send(None)
                        return
                    got = frame_record(
                        item,
                        index=-1,
                        connection=self.connection,
                        time=trio.current_time() - self._start,
                        direction=Direction.TO_CLIENT,
                    )
                    close_fds(item.fds)
                    if got.is_request:
                        await self._serve(got)
                    else:
                        await self._replies_in.send(got)
        except _Diverged as exc:
            self._failure = self._failure or exc.divergence
            scope.cancel()
        except (OSError, RemoteProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
            await self._replies_in.send(None)

    async def _serve(self, got: Record) -> None:
        """Check a server request against the recording, then answer it from memory."""
        if not self._expected_requests:
            last = self.records[-1]
            raise self._diverged(last, "message", "(no request from the server)", got.describe())
        expected = self._expected_requests.popleft()
        self.compared += 1
        difference = compare_records(expected, got, ignore=self.ignore)
        if difference is not None:
            raise self._diverged(expected, *difference)
        request = _decode(got)
        assert request is not None and isinstance(request, Request)
        answer = self._recorded_answers.get(expected.index)
        recorded = _decode(answer) if answer is not None else None
        if isinstance(request, DmaReadRequest) and isinstance(recorded, DmaReadReply):
            self._memory.write(request.address, recorded.data)
        if not request.no_reply:
            await self._write(expected, self._memory.answer(request).encode())
        self._served += 1
        self._served_changed.set()
        self._served_changed = trio.Event()


async def replay(
    transcript: Sequence[Record] | str | os.PathLike[str],
    socket_path: str | os.PathLike[str],
    *,
    reply_timeout: float = DEFAULT_TIMEOUT,
    ignore: Sequence[str] = (),
    pace: bool = False,
    connect_patience: float = 5.0,
) -> ReplayResult:
    """Play the client side of ``transcript`` against the server at ``socket_path``.

    Each recorded connection is replayed on a connection of its own, one
    after the other.  ``reply_timeout`` bounds the wait for each expected
    message, not the whole replay.  Returns at the first divergence, or after the whole
    transcript; a server that cannot be reached raises ``OSError``.

        result = await replay("session.jsonl", "/run/hello.sock")
        assert result.ok, result.divergence
    """
    records = load_transcript(transcript) if isinstance(transcript, (str, os.PathLike)) else list(transcript)
    sent = compared = connections = 0
    for _number, group in by_connection(records):
        runner = _ConnectionReplay(
            group,
            Path(socket_path),
            timeout=reply_timeout,
            ignore=ignore,
            pace=pace,
            patience=connect_patience,
        )
        divergence = await runner.run()
        sent += runner.sent
        compared += runner.compared
        connections += 1
        if divergence is not None:
            return ReplayResult(divergence, sent, compared, connections)
    return ReplayResult(None, sent, compared, connections)


def run_replay(
    transcript: Sequence[Record] | str | os.PathLike[str],
    socket_path: str | os.PathLike[str],
    **options: Any,
) -> ReplayResult:
    """``replay`` from synchronous code (its own Trio run)."""
    return trio.run(lambda: replay(transcript, socket_path, **options))
