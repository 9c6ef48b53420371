# Rules of this module:
#
# * Framing is the codec's: a ``vdev.protocol.Connection`` decides where each
#   message ends and which fds belong to it.  Alongside it this module keeps
#   a mirror of the bytes, so every frame comes out exactly as it arrived:
#   reserved flag bits, padding and malformed payloads included.  A proxy
#   forwards those bytes, never a re-encoding.
# * A payload that does not decode is still a frame (``message`` is ``None``,
#   ``error`` says why); the stream stays in sync.
# * When the framing itself is lost (a size below the header, or above the
#   limit) the reader hands out what it buffered, and from then on every
#   chunk, as ``Unframed``: a proxy keeps passing bytes it can no longer
#   interpret instead of breaking the connection itself.
# * The same holds at the end of a stream that stops inside a message: the
#   partial message comes out as ``Unframed`` before ``ConnectionClosed``.
# * No I/O; fds handed out belong to the caller.
"""Cut a byte stream with fds into frames: the original bytes plus the decoded message."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from vdev.protocol import (
    NEED_DATA,
    Connection,
    ConnectionClosed,
    Header,
    Message,
    NeedData,
    RemoteProtocolError,
)

#: Frames up to this size are framed; larger claims switch the reader to
#: pass-through.  Far above any negotiated transfer size, so only a broken
#: or hostile header reaches it.
DEFAULT_FRAME_LIMIT = 64 << 20


@dataclass(frozen=True)
class Frame:
    """One whole message as it was on the wire."""

    #: The frame's bytes, header included, untouched.
    data: bytes
    #: The fds that arrived with it (SCM_RIGHTS).
    fds: tuple[int, ...]
    header: Header
    #: The decoded message, or ``None`` when its payload is malformed.
    message: Message | None
    #: Why the payload did not decode.
    error: RemoteProtocolError | None = None


@dataclass(frozen=True)
class Unframed:
    """Bytes that cannot be cut into messages any more (see ``FrameReader``)."""

    data: bytes
    fds: tuple[int, ...]
    reason: str


class FrameReader:
    """One direction of a vfio-user stream, cut into ``Frame`` objects.

    >>> from vdev.protocol import DeviceResetRequest
    >>> reader = FrameReader()
    >>> reader.receive_data(DeviceResetRequest(msg_id=3).encode())
    >>> frame = reader.next_frame()
    >>> frame.header.msg_id, type(frame.message).__name__
    (3, 'DeviceResetRequest')
    """

    def __init__(self, *, max_frame_size: int = DEFAULT_FRAME_LIMIT) -> None:
        self._conn = Connection(max_message_size=max_frame_size)
        self._mirror = bytearray()
        self._raw: deque[tuple[bytes, tuple[int, ...]]] = deque()
        self._eof = False
        #: Why framing was lost, once it was.
        self.lost: str | None = None

    def receive_data(self, data: bytes, fds: Iterable[int] = ()) -> None:
        """Add one read's bytes and fds; ``b""`` is the end of the stream."""
        fds = tuple(fds)
        if not data:
            self._eof = True
        if self.lost is not None:
            if data:
                self._raw.append((bytes(data), fds))
            return
        self._conn.receive_data(data, fds)
        self._mirror += data

    def next_frame(self) -> Frame | Unframed | ConnectionClosed | Literal[NeedData.NEED_DATA]:
        """The next frame, pass-through bytes, ``ConnectionClosed`` or ``NEED_DATA``."""
        if self.lost is not None:
            if self._raw:
                data, fds = self._raw.popleft()
                return Unframed(data, fds, self.lost)
            return ConnectionClosed() if self._eof else NEED_DATA
        try:
            event = self._conn.next_event()
        except RemoteProtocolError as exc:
            if exc.header is None:
                self.lost = str(exc)
                leftover = bytes(self._mirror)
                self._mirror.clear()
                return Unframed(leftover, exc.fds, self.lost)
            return Frame(self._take(exc.header.size), exc.fds, exc.header, None, exc)
        if event is NEED_DATA or isinstance(event, ConnectionClosed):
            return event
        header = Header.decode(self._mirror)
        return Frame(self._take(header.size), event.fds, header, event)

    def _take(self, size: int) -> bytes:
        data = bytes(self._mirror[:size])
        del self._mirror[:size]
        return data
