"""The proxy's I/O shell: sockets, tasks and timers around the sans-IO pieces.

Design, where it lives:

* The proxy listens on a UNIX socket like a vfio-user server.  Each client
  it accepts gets its own upstream connection to the real server and a
  session of two pump tasks, one per direction.  A session ends when
  either peer hangs up or a ``Close`` fault fires; both sockets are then
  closed, so each peer sees what it would see if the other had gone.
* A pump reads whatever the socket gives (bytes and SCM_RIGHTS fds), cuts
  it into frames with ``FrameReader``, and for each frame asks the
  ``FaultInjector`` what to send.  Untouched frames go out as the exact
  bytes that came in, with the same fds: region fds in GET_REGION_INFO
  replies, memfds in DMA_MAP, eventfds in SET_IRQS all pass through.
* The proxy owns every fd it receives and closes it once the last action
  that sends it is done (a delayed send holds it until it fires).
* Delays are timers in the session's nursery: later frames overtake a
  delayed one.  Writes to one socket are serialised by a lock, so frames
  are never interleaved.
* The transcript and the fault log are written synchronously, a line per
  event, flushed; they are small compared with a socket round trip.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import IO

import trio

from vdev.protocol import NEED_DATA, ConnectionClosed, RemoteProtocolError
from vdev.proxy._fds import FdInfo, close_fds, create_fd
from vdev.proxy._framing import Frame, FrameReader, Unframed
from vdev.proxy._inject import FaultInjector, Hangup, InjectedFault, RequestTracker, Send
from vdev.proxy._plan import Direction, WireFaultPlan
from vdev.proxy._transcript import TranscriptWriter, frame_record
from vdev.sockets import prepare_socket_path, same_socket
from vdev.transport import FdStream

log = logging.getLogger("vdev.proxy")

_PEER_GONE = (OSError, trio.BrokenResourceError, trio.ClosedResourceError)


class _Peer:
    """One side of a session: a stream and the lock that keeps its frames whole."""

    def __init__(self, stream: FdStream) -> None:
        self.stream = stream
        self.lock = trio.Lock()

    async def send(self, data: bytes, fds: Sequence[int]) -> None:
        async with self.lock:
            await self.stream.send(data, fds)

    def close(self) -> None:
        self.stream.close()


class _FdBundle:
    """A frame's fds, closed when the last send that carries them is done."""

    def __init__(self, fds: tuple[int, ...], uses: int) -> None:
        self.fds = fds
        self._uses = uses
        if uses == 0:
            close_fds(fds)

    def release(self) -> None:
        self._uses -= 1
        if self._uses == 0:
            close_fds(self.fds)


class Proxy:
    """A vfio-user man-in-the-middle that can record sessions and inject faults.

    Clients connect to ``listen``; for each, the proxy connects to the
    server at ``connect`` and relays messages both ways, fds included.
    ``plan`` says which faults to inject, ``transcript`` receives a JSON
    line per message, ``fault_log`` a JSON line per injected fault.  Every
    injected fault is also kept in :attr:`injected`.

        async with proxied(proxy_path, server_path, plan=plan) as proxy:
            ...  # point QEMU or a Client at proxy_path
    """

    def __init__(
        self,
        listen: str | os.PathLike[str],
        connect: str | os.PathLike[str],
        *,
        plan: WireFaultPlan | None = None,
        transcript: IO[str] | None = None,
        fault_log: IO[str] | None = None,
        connect_patience: float = 5.0,
    ) -> None:
        if same_socket(listen, connect):
            raise ValueError(f"the proxy cannot listen on the socket it connects to ({listen})")
        self.listen_path = Path(listen)
        self.connect_path = Path(connect)
        self.injector = FaultInjector(plan)
        self._transcript = TranscriptWriter(transcript) if transcript is not None else None
        self._fault_log = fault_log
        self._connect_patience = connect_patience
        #: Every fault injected so far, oldest first.
        self.injected: list[InjectedFault] = []
        #: Clients accepted so far.
        self.connections = 0
        #: Client connections ended so far (both of their sockets closed).
        self.closed = 0
        self._index = 0
        self._started = time.monotonic()
        self._changed = trio.Event()

    async def serve(self, *, task_status: trio.TaskStatus[Proxy] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen and relay until cancelled; the socket exists once started.

        A live server's socket at the listening path is never replaced
        (:class:`~vdev.sockets.SocketPathError`); a stale one is.
        """
        listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with listener:
            prepare_socket_path(self.listen_path)
            await listener.bind(os.fspath(self.listen_path))
            try:
                os.chmod(self.listen_path, 0o600)
                listener.listen(16)
                async with trio.open_nursery() as nursery:
                    task_status.started(self)
                    while True:
                        sock, _ = await listener.accept()
                        number = self.connections
                        self.connections += 1
                        nursery.start_soon(self._session, sock, number)
            finally:
                self.listen_path.unlink(missing_ok=True)  # noqa: ASYNC240

    async def wait_injected(self, count: int = 1) -> list[InjectedFault]:
        """Wait until at least ``count`` faults have been injected."""
        while len(self.injected) < count:
            await self._changed.wait()
        return list(self.injected)

    async def wait_closed(self, count: int = 1) -> None:
        """Wait until at least ``count`` client connections have ended, both of their sockets closed.

        After a ``Close`` fault this is the moment the client can see the
        hangup: everything sent before it is in the client's socket, then EOF.
        """
        while self.closed < count:
            await self._changed.wait()

    # -- sessions ----------------------------------------------------------------------

    async def _session(self, sock: trio.socket.SocketType, number: int) -> None:
        downstream = _Peer(FdStream(sock))
        try:
            upstream = _Peer(await FdStream.connect(self.connect_path, patience=self._connect_patience))
        except OSError as exc:
            log.warning("proxy: connection %d: cannot reach the server at %s: %s", number, self.connect_path, exc)
            downstream.close()
            return
        log.info("proxy: connection %d open", number)
        try:
            await _Session(self, number, downstream, upstream).run()
        finally:
            downstream.close()
            upstream.close()
            log.info("proxy: connection %d closed", number)
            self.closed += 1
            self._notify()

    def _next_index(self) -> int:
        index = self._index
        self._index += 1
        return index

    def _note_fault(self, fault: InjectedFault) -> None:
        self.injected.append(fault)
        line = fault.to_json()
        log.info("proxy: injected %s", line)
        if self._fault_log is not None:
            self._fault_log.write(line + "\n")
            self._fault_log.flush()
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()


class _Session:
    """One client, its upstream connection and the two pumps between them."""

    def __init__(self, proxy: Proxy, number: int, downstream: _Peer, upstream: _Peer) -> None:
        self.proxy = proxy
        self.number = number
        self.downstream = downstream
        self.upstream = upstream
        self.tracker = RequestTracker()
        self.started = time.monotonic()
        self._nursery: trio.Nursery | None = None

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._pump, self.downstream, self.upstream, Direction.TO_SERVER)
            nursery.start_soon(self._pump, self.upstream, self.downstream, Direction.TO_CLIENT)

    def _end(self) -> None:
        assert self._nursery is not None
        self._nursery.cancel_scope.cancel()

    async def _pump(self, source: _Peer, target: _Peer, direction: Direction) -> None:
        reader = FrameReader()
        try:
            while True:
                data, fds = await source.stream.receive()
                reader.receive_data(data, fds)
                while (item := reader.next_frame()) is not NEED_DATA:
                    if isinstance(item, ConnectionClosed):
                        return
                    if isinstance(item, Unframed):
                        await self._pass_unframed(item, target, direction)
                    elif not await self._forward(item, target, direction):
                        return
        except (*_PEER_GONE, RemoteProtocolError) as exc:
            log.info("proxy: connection %d: %s side: %s", self.number, direction.value, exc)
        finally:
            self._end()

    async def _forward(self, frame: Frame, target: _Peer, direction: Direction) -> bool:
        """Relay one frame as the fault plan says; ``False`` once the session must end."""
        request = self.tracker.observe(direction, frame)
        now = time.monotonic()
        actions, injected = self.proxy.injector.apply(
            frame,
            direction=direction,
            request=request,
            connection=self.number,
            time=time.time(),
            elapsed=now - self.proxy._started,
        )
        self._record(frame, direction, now, injected)
        if injected is not None:
            self.proxy._note_fault(injected)
        bundle = _FdBundle(frame.fds, sum(1 for a in actions if isinstance(a, Send) and a.fds))
        pending = list(actions)
        try:
            while pending:
                action = pending.pop(0)
                if isinstance(action, Hangup):
                    return False
                if action.delay > 0:
                    assert self._nursery is not None
                    self._nursery.start_soon(self._send_later, target, action, bundle)
                else:
                    await self._send(target, action, bundle)
        finally:
            # Sends that will never happen (the peer went away) give their fds back.
            for action in pending:
                if isinstance(action, Send) and action.fds:
                    bundle.release()
        return True

    async def _send_later(self, target: _Peer, action: Send, bundle: _FdBundle) -> None:
        try:
            await trio.sleep(action.delay)
        except BaseException:
            if action.fds:
                bundle.release()
            raise
        try:
            await self._send(target, action, bundle)
        except _PEER_GONE as exc:
            log.info("proxy: connection %d: delayed message not delivered: %s", self.number, exc)
            self._end()

    async def _send(self, target: _Peer, action: Send, bundle: _FdBundle) -> None:
        attached: list[int] = []
        kept: list[int] = []
        try:
            for kind in action.attach:
                fd, extra = create_fd(FdInfo(kind, 4096 if kind == "memfd" else None))
                attached.append(fd)
                kept.extend(extra)
            await target.send(action.data, (*action.fds, *attached))
        finally:
            close_fds(attached + kept)
            if action.fds:
                bundle.release()

    async def _pass_unframed(self, item: Unframed, target: _Peer, direction: Direction) -> None:
        log.warning(
            "proxy: connection %d: %s framing lost (%s); passing bytes through",
            self.number,
            direction.value,
            item.reason,
        )
        writer = self.proxy._transcript
        if writer is not None:
            writer.write(
                frame_record(
                    item,
                    index=self.proxy._next_index(),
                    connection=self.number,
                    time=time.monotonic() - self.started,
                    direction=direction,
                )
            )
        try:
            if item.data:
                await target.send(item.data, item.fds)
        finally:
            close_fds(item.fds)

    def _record(self, frame: Frame, direction: Direction, now: float, injected: InjectedFault | None) -> None:
        writer = self.proxy._transcript
        if writer is None:
            return
        writer.write(
            frame_record(
                frame,
                index=self.proxy._next_index(),
                connection=self.number,
                time=now - self.started,
                direction=direction,
                faults=(injected.fault,) if injected is not None else (),
            )
        )


@asynccontextmanager
async def proxied(
    listen: str | os.PathLike[str],
    connect: str | os.PathLike[str],
    *,
    plan: WireFaultPlan | None = None,
    transcript: IO[str] | None = None,
    fault_log: IO[str] | None = None,
) -> AsyncIterator[Proxy]:
    """Run a ``Proxy`` for the duration of the ``async with`` block.

    The listening socket exists when the block starts; on exit every
    session is cut and the socket removed.

        async with served(Hello(), server_path), proxied(proxy_path, server_path) as proxy:
            async with Client.connect(proxy_path) as client:
                ...
    """
    proxy = Proxy(listen, connect, plan=plan, transcript=transcript, fault_log=fault_log)
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.serve)
        try:
            yield proxy
        finally:
            nursery.cancel_scope.cancel()
