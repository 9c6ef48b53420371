"""vfio-user's transport for Trio code: a UNIX stream socket that moves bytes and fds, nothing else.

The client (:mod:`vdev.client`), the fault proxy and replay (:mod:`vdev.proxy`)
and test peers (:mod:`vdev.testing`) all speak vfio-user over this one
shell; framing and decoding live in the sans-IO :mod:`vdev.protocol`, so
this module only moves chunks between the socket and a ``Connection``.
"""

from __future__ import annotations

import array
import errno
import os
import socket
from collections.abc import Sequence
from errno import EMSGSIZE

import trio

from vdev.protocol import RemoteProtocolError

#: Most fds Linux passes in one SCM_RIGHTS message (SCM_MAX_FD); sizing the
#: ancillary buffer for all of them means the kernel never truncates it.
_MAX_FDS_PER_READ = 253
_READ_SIZE = 256 * 1024


class FdStream:
    """A connected AF_UNIX stream socket that passes fds with SCM_RIGHTS."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self._sock = sock
        #: A write was interrupted after part of a message went out: the
        #: peer's view of the stream is now out of sync for good.
        self.torn = False

    @classmethod
    async def connect(cls, path: str | os.PathLike[str], *, patience: float = 5.0) -> FdStream:
        """Connect to the server at ``path``.

        A vfio-user server (libvfio-user listens with a backlog of 0) may
        have no room for a pending connection while it is busy with another
        client; a non-blocking AF_UNIX connect then fails with EAGAIN, which
        Trio reports as success.  The connection is checked and retried for
        up to ``patience`` seconds.
        """
        with trio.move_on_after(patience):
            while True:
                sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    await sock.connect(os.fspath(path))
                    sock.getpeername()
                    return cls(sock)
                except OSError as exc:
                    sock.close()
                    if exc.errno not in (errno.ENOTCONN, errno.EAGAIN):
                        raise
                except BaseException:
                    sock.close()
                    raise
                await trio.sleep(0.005)
        raise ConnectionRefusedError(errno.EAGAIN, f"{path}: the server accepts no connection")

    async def send(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Write all of ``data``; the fds ride with its first byte.

        Partial writes are finished without the fds, so the receiver sees
        them exactly once, at the start of the message.
        """
        view = memoryview(data)
        ancillary = []
        if fds:
            ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
        sent = 0
        try:
            sent = await self._sock.sendmsg([view], ancillary)
            while sent < len(view):
                sent += await self._sock.send(view[sent:])
        except BaseException:
            self.torn = self.torn or sent > 0
            raise

    async def receive(self) -> tuple[bytes, tuple[int, ...]]:
        """One read: some bytes and the fds that came with them; ``b""`` at EOF.

        Received fds are close-on-exec, so a child process started later (a
        sample server, QEMU) does not inherit them.
        """
        data, ancillary, flags, _address = await self._sock.recvmsg(
            _READ_SIZE,
            socket.CMSG_SPACE(_MAX_FDS_PER_READ * array.array("i").itemsize),
            socket.MSG_CMSG_CLOEXEC,
        )
        fds = array.array("i")
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                usable = len(payload) - len(payload) % fds.itemsize
                fds.frombytes(payload[:usable])
        if flags & socket.MSG_CTRUNC:
            for fd in fds:
                os.close(fd)
            raise RemoteProtocolError("the peer sent more fds than fit in one read", EMSGSIZE)
        return data, tuple(fds)

    def shutdown_write(self) -> None:
        """Half-close: the peer reads the end of the stream, and may still answer."""
        self._sock.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._sock.close()
