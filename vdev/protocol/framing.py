# Rules of this module:
#
# * No I/O.  Bytes and fds go in through ``receive_data``; whole messages come
#   out of ``next_event``.  Messages go in through ``send``; (bytes, fds) come
#   out, for the caller to write with one sendmsg carrying the fds.
# * Partial reads are normal: bytes accumulate until the header's size is
#   buffered.  ``NEED_DATA`` means "feed me more".
# * Fds belong to the message that contains the last byte of the chunk they
#   arrived with.  A sender passes fds with the first bytes of their message,
#   and Linux ends a read of a stream socket right after (or inside) the
#   stretch that carried fds; a read may glue earlier messages in front of it,
#   never later ones after it.
# * ``receive_data(b"")`` means end of stream.  At a message boundary that
#   yields ``ConnectionClosed`` (forever after); inside a message it is a
#   remote error.
# * A header whose size is below 16 or above ``max_message_size`` loses the
#   framing: the error is fatal and raised again by every later call.  A
#   malformed payload is not: the message is consumed, the error carries its
#   header, and the next call goes on with the next message.
# * Fds of a message that fails to decode travel with the error; the caller
#   owns (and must close) every fd this module hands out.
"""Framing: turn a byte stream with fds into messages, and messages into bytes."""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from errno import ECONNRESET, EMSGSIZE
from typing import Literal

from vdev.protocol.capabilities import DEFAULT_MAX_DATA_XFER_SIZE
from vdev.protocol.errors import RemoteProtocolError
from vdev.protocol.header import HEADER_SIZE, Header
from vdev.protocol.messages import Message, decode_message

#: Room for the largest default data transfer plus the headers around it.
DEFAULT_MAX_MESSAGE_SIZE = DEFAULT_MAX_DATA_XFER_SIZE + 4096


class NeedData(enum.Enum):
    """The type of ``NEED_DATA``."""

    NEED_DATA = enum.auto()


#: ``next_event`` needs more bytes before it can return a message.
NEED_DATA: Literal[NeedData.NEED_DATA] = NeedData.NEED_DATA


@dataclass(frozen=True)
class ConnectionClosed:
    """The peer ended the stream cleanly, between two messages."""


Event = Message | ConnectionClosed


class Connection:
    """One end of a vfio-user byte stream, without the stream.

    Example, feeding a message in two pieces::

        >>> from vdev.protocol import DeviceResetRequest
        >>> conn = Connection()
        >>> data, fds = conn.send(DeviceResetRequest(msg_id=7))
        >>> conn.receive_data(data[:5])
        >>> conn.next_event()
        <NeedData.NEED_DATA: 1>
        >>> conn.receive_data(data[5:])
        >>> conn.next_event()
        DeviceResetRequest(msg_id=7, fds=(), no_reply=False)
    """

    def __init__(self, *, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> None:
        #: Larger incoming messages are refused; raise it after negotiating
        #: a larger ``max_data_xfer_size``.
        self.max_message_size = max_message_size
        self._buffer = bytearray()
        self._offset = 0  # stream offset of self._buffer[0]
        self._fds: deque[tuple[int, tuple[int, ...]]] = deque()  # (offset of last byte, fds)
        self._closed = False
        self._error: RemoteProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as part of a message."""
        return len(self._buffer)

    def receive_data(self, data: bytes, fds: Iterable[int] = ()) -> None:
        """Add what one read returned: bytes, and the fds that came with them.

        Empty ``data`` signals the end of the stream.
        """
        fds = tuple(fds)
        if self._closed:
            raise RuntimeError("receive_data() after the end of the stream")
        if not data:
            if fds:
                raise ValueError("fds cannot arrive without data")
            self._closed = True
            return
        self._buffer += data
        if fds:
            self._fds.append((self._offset + len(self._buffer) - 1, fds))

    def next_event(self) -> Event | Literal[NeedData.NEED_DATA]:
        """The next complete message, ``ConnectionClosed``, or ``NEED_DATA``."""
        if self._error is not None:
            raise self._error
        if len(self._buffer) < HEADER_SIZE:
            return self._starved()
        try:
            header = Header.decode(self._buffer)
        except RemoteProtocolError as exc:
            raise self._fail(exc) from None
        if header.size > self.max_message_size:
            raise self._fail(
                RemoteProtocolError(
                    f"message of {header.size} bytes exceeds the limit of {self.max_message_size}",
                    EMSGSIZE,
                )
            )
        if len(self._buffer) < header.size:
            return self._starved()
        payload = bytes(self._buffer[HEADER_SIZE : header.size])
        del self._buffer[: header.size]
        end = self._offset + header.size
        self._offset = end
        return decode_message(header, payload, self._take_fds(end))

    def send(self, message: Message) -> tuple[bytes, tuple[int, ...]]:
        """The bytes to write for ``message`` and the fds to pass with them."""
        return message.encode(), message.fds

    def _starved(self) -> ConnectionClosed | Literal[NeedData.NEED_DATA]:
        if not self._closed:
            return NEED_DATA
        if self._buffer:
            raise self._fail(
                RemoteProtocolError(
                    f"stream ended inside a message ({len(self._buffer)} bytes pending)",
                    ECONNRESET,
                )
            )
        return ConnectionClosed()

    def _take_fds(self, end: int) -> tuple[int, ...]:
        taken: list[int] = []
        while self._fds and self._fds[0][0] < end:
            taken.extend(self._fds.popleft()[1])
        return tuple(taken)

    def _fail(self, error: RemoteProtocolError) -> RemoteProtocolError:
        """Make ``error`` final, handing it every fd still buffered."""
        error.fds = self._take_fds(self._offset + len(self._buffer))
        self._error = error
        return error
