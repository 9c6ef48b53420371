"""A scripted vfio-user server: the other end of a connection, stepped by the test.

For testing code that *is* a client (vdev's own :class:`vdev.client.Client`,
or yours): a real server answers the way a well-behaved server does, while a
test needs to say exactly what the server sends, in which order, and check
what comes back.  :class:`ScriptedServer` listens on a real UNIX socket, so
the client under test runs its real I/O path (fds included); each accepted
:class:`ScriptedConnection` speaks :mod:`vdev.protocol` messages through a
sans-IO :class:`~vdev.protocol.Connection`, or raw bytes the protocol
forbids.

    >>> import trio
    >>> from vdev.client import Client
    >>> from vdev.protocol import DeviceInfoReply, DeviceInfoRequest
    >>> from vdev.testing import open_scripted_server
    >>> async def answer(peer):
    ...     request = await peer.expect(DeviceInfoRequest)
    ...     await peer.send(DeviceInfoReply(msg_id=request.msg_id, flags=0, num_regions=9, num_irqs=5))
    >>> async def main():
    ...     async with open_scripted_server() as server, Client.connect(server.path, negotiate=False) as client:
    ...         peer = await server.accept()
    ...         async with trio.open_nursery() as nursery:
    ...             nursery.start_soon(answer, peer)
    ...             return await client.device_info()
    >>> trio.run(main).num_regions
    9

Received messages may carry fds (a DMA_MAP's memfd, SET_IRQS eventfds):
they are the test's to close.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TypeVar

import trio

from vdev.protocol import (
    NEED_DATA,
    Capabilities,
    Connection,
    ConnectionClosed,
    Message,
    VersionReply,
    VersionRequest,
)
from vdev.transport import FdStream

__all__ = ["ScriptedConnection", "ScriptedServer", "UnexpectedMessage", "open_scripted_server"]

M = TypeVar("M", bound=Message)


class UnexpectedMessage(AssertionError):
    """The client did something other than what the script expects next (another message, a hang-up)."""


class ScriptedConnection:
    """The server end of one accepted connection; every step is the test's."""

    def __init__(self, stream: FdStream) -> None:
        self._stream = stream
        self._conn = Connection()

    async def receive(self) -> Message:
        """The client's next message; :class:`UnexpectedMessage` if it hangs up instead."""
        while (event := self._conn.next_event()) is NEED_DATA:
            self._conn.receive_data(*await self._stream.receive())
        if isinstance(event, ConnectionClosed):
            raise UnexpectedMessage("the client hung up while a message was expected")
        return event

    async def expect(self, kind: type[M]) -> M:
        """The client's next message, which must be a ``kind``; else :class:`UnexpectedMessage`."""
        message = await self.receive()
        if not isinstance(message, kind):
            for fd in message.fds:
                os.close(fd)
            raise UnexpectedMessage(f"expected {kind.__name__}, the client sent {message!r}")
        return message

    async def expect_hang_up(self) -> None:
        """Wait for the client to close the connection; a message instead is :class:`UnexpectedMessage`."""
        while (event := self._conn.next_event()) is NEED_DATA:
            self._conn.receive_data(*await self._stream.receive())
        if not isinstance(event, ConnectionClosed):
            raise UnexpectedMessage(f"expected the client to hang up, it sent {event!r}")

    async def send(self, message: Message) -> None:
        """Send a message (a reply, or a server-to-client command such as DMA_READ) with its fds."""
        await self._stream.send(*self._conn.send(message))

    async def send_raw(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Send bytes as they are, valid or not, for testing how a client copes."""
        await self._stream.send(data, fds)

    async def negotiate(
        self, *, version: tuple[int, int] = (0, 1), capabilities: Capabilities | None = None
    ) -> VersionRequest:
        """Answer the client's VERSION with ``version`` and ``capabilities``; return what it proposed."""
        request = await self.expect(VersionRequest)
        major, minor = version
        reply = VersionReply(msg_id=request.msg_id, major=major, minor=minor, capabilities=capabilities)
        await self.send(reply)
        return request

    def close(self) -> None:
        """Hang up on the client."""
        self._stream.close()


class ScriptedServer:
    """A socket at :attr:`path` where clients connect; :meth:`accept` hands over each connection."""

    def __init__(self, path: Path, sock: trio.socket.SocketType) -> None:
        self.path = path
        self._sock = sock

    async def accept(self) -> ScriptedConnection:
        """The next client's connection (clients may connect before it is called)."""
        connection, _ = await self._sock.accept()
        return ScriptedConnection(FdStream(connection))


@asynccontextmanager
async def open_scripted_server(path: str | os.PathLike[str] | None = None) -> AsyncIterator[ScriptedServer]:
    """Listen at ``path`` (by default a fresh, short path) for the ``async with`` block.

    The socket and any directory made for it are removed afterwards.
    """
    with tempfile.TemporaryDirectory(prefix="vdev-peer-") as directory:
        where = Path(path) if path is not None else Path(directory) / "sock"
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        try:
            await sock.bind(os.fspath(where))
            sock.listen(8)
            yield ScriptedServer(where, sock)
        finally:
            sock.close()
            if path is not None:
                where.unlink(missing_ok=True)
