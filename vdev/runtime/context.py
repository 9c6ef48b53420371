"""One device served through one libvfio-user context, driven from Trio.

How the C library and Trio meet (the design, written where it lives):

* The context is created with ``LIBVFIO_USER_FLAG_ATTACH_NB``.  A Trio task
  waits on ``vfu_get_poll_fd()`` (fetched again after every attach and
  disconnect, since it changes) and, when it is readable, calls
  ``vfu_run_ctx``.  ``vfu_attach_ctx`` always runs in a worker thread: it
  waits for the client's VERSION message.
* libvfio-user's callbacks are synchronous; vdev handlers may be ``async``.
  So a device is served in one of two ways, chosen per device:

  - **inline** (every handler is a plain function): ``vfu_run_ctx`` runs on
    the Trio thread and each callback drives the device's handler coroutine
    to completion on the spot.  No thread hop: this is the fast path.
  - **threaded** (some handler is ``async``): ``vfu_run_ctx`` runs in a
    worker thread; a callback hands the access to the Trio thread with
    ``trio.from_thread.run`` and blocks until the handler has finished.  An
    awaiting handler stalls only this device; every other device and task
    runs on.  Four thread wake-ups per access are the price.

* libvfio-user is not thread-safe per context, so every call into a context
  holds :class:`ContextLock`.  A callback releases it while the handler
  runs, so a handler may trigger interrupts or do DMA on its own context;
  an interrupt fired from Trio while C code holds the lock is queued and
  fired by the lock's holder on release, so Trio never blocks on the lock.
* libvfio-user tells the server neither which eventfds the client installed
  nor when: a trigger without one fails with ENOENT, and nothing announces
  SET_IRQS.  An MSI-X vector whose trigger failed so is held pending by the
  model; while one is, the runtime peeks at each message's header and, after
  a SET_IRQS, lets the model try the held vectors again.
* All device code runs on the Trio thread.  An exception in a handler
  becomes ``-1``/``errno`` for the library (an error reply to that access)
  and a log line naming the device, region, offset and register; it never
  crosses into C.
* A context listens on a socket path it creates, or on a listening socket
  it is handed (an fd from a parent process or from socket activation).
  The latter, and signalling ERR/REQ, need vdev's libvfio-user patches;
  without them they fail with :class:`~vdev.libvfio_user.bindings.MissingFixError`.
"""

from __future__ import annotations

import collections
import ctypes
import errno
import functools
import inspect
import logging
import os
import re
import socket
import struct
import threading
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import trio

from vdev import sockets
from vdev.libvfio_user import bindings
from vdev.libvfio_user.bindings import Library
from vdev.libvfio_user.constants import (
    LIBVFIO_USER_FLAG_ATTACH_NB,
    PCI_HEADER_TYPE_NORMAL,
    VFU_DEV_TYPE_PCI,
    VFU_REGION_FLAG_ALWAYS_CB,
    VFU_REGION_FLAG_MEM,
    VFU_REGION_FLAG_READ,
    VFU_REGION_FLAG_RW,
    VFU_TRANS_SOCK,
    PciType,
    ResetType,
)
from vdev.model.bars import BarKind
from vdev.model.device import Device, ResetKind
from vdev.model.dma import DmaError, DmaRegion
from vdev.model.faults import Fault, InjectedError
from vdev.model.registers import call_hook
from vdev.protocol.constants import IrqIndex, RegionIndex
from vdev.protocol.errors import RemoteProtocolError
from vdev.protocol.header import HEADER_SIZE, Command, Header

log = logging.getLogger("vdev")

#: The model's names for libvfio-user's reset reasons.
_RESET_KINDS = {
    ResetType.DEVICE: ResetKind.DEVICE,
    ResetType.FLR: ResetKind.FLR,
    ResetType.LOST_CONNECTION: ResetKind.LOST_CONNECTION,
}

_DISCONNECTED = frozenset({errno.ENOTCONN, errno.ECONNRESET, errno.EPIPE})
_LOG_LEVELS = {3: logging.ERROR, 4: logging.WARNING, 5: logging.INFO, 6: logging.INFO, 7: logging.DEBUG}
# libvfio-user logs these as warnings or errors, but they describe a client
# doing what clients do, so they are debug output here: a trigger of an
# interrupt the client did not wire, and QEMU unmapping DMA ranges it never
# mapped (behind a vIOMMU it unmaps whole ranges: 60-280 per guest boot).
_ROUTINE_MESSAGES = re.compile(
    r"no fd for interrupt"
    r"|failed to remove DMA region .*: No such file or directory$"
    rf"|msg0x[0-9a-f]+: cmd {int(Command.DMA_UNMAP)} failed: No such file or directory$"
)


class ContextLock:
    """Serialises calls into one libvfio-user context without ever blocking Trio."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._deferred: collections.deque[Callable[[], None]] = collections.deque()

    def acquire(self) -> None:
        self._lock.acquire()

    def release(self) -> None:
        """Run what was deferred while we held the lock, then let go."""
        while True:
            while self._deferred:
                self._deferred.popleft()()
            self._lock.release()
            if not self._deferred or not self._lock.acquire(blocking=False):
                return

    def run_or_defer(self, call: Callable[[], None]) -> None:
        """Run ``call`` now if the context is free, else when its holder releases it."""
        if self._lock.acquire(blocking=False):
            try:
                call()
            finally:
                self.release()
        else:
            self._deferred.append(call)


class HandlerSuspendedError(RuntimeError):
    """An inline device's handler awaited something that really waits."""


def complete_now(coroutine: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine that is not expected to wait, to completion, right here.

    Inline devices have only plain handlers, so the framework's ``async``
    plumbing around them finishes on the first step.
    """
    try:
        coroutine.send(None)
    except StopIteration as finished:
        return finished.value
    coroutine.close()
    raise HandlerSuspendedError(
        "a handler awaited inside an inline device; make that handler `async def` so the device is served threaded"
    )


def needs_thread(device: Device) -> bool:
    """Whether any of the device's handlers is ``async`` (so it must be served threaded)."""
    hooks: list[Any] = [type(device).on_reset, type(device).on_quiesce]
    for bar in device.bars():
        hooks += [*bar.registers.read_hooks.values(), *bar.registers.write_hooks.values(), bar.raw_read, bar.raw_write]
    return any(inspect.iscoroutinefunction(hook) for hook in hooks if hook is not None)


class ServeError(Exception):
    """A device could not be set up for serving (bad socket path, library refusal)."""


def listening_socket_path(fd: int) -> Path:
    """Where the inherited socket ``fd`` listens; :class:`ServeError` if it is not a listening UNIX socket.

    Checked here, before libvfio-user sees the fd, so that a wrong fd gets a
    plain one-line error whatever the library.
    """
    try:
        probe = socket.socket(fileno=os.dup(fd))
    except OSError as exc:
        raise ServeError(f"fd {fd} is not an open socket: {exc.strerror}") from None
    with probe:
        listening = probe.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        if probe.family != socket.AF_UNIX or probe.type != socket.SOCK_STREAM or not listening:
            raise ServeError(f"fd {fd} is not a listening UNIX stream socket")
        name = probe.getsockname()
    if isinstance(name, bytes):  # an abstract address
        return Path("@" + name.lstrip(b"\0").decode(errors="replace"))
    return Path(name or f"(unnamed socket, fd {fd})")


def prepare_socket_path(path: Path) -> None:
    """Make ``path`` free for a new listening socket, refusing to clobber anything (see :mod:`vdev.sockets`)."""
    try:
        sockets.prepare_socket_path(path)
    except sockets.SocketPathError as exc:
        raise ServeError(str(exc)) from None


class DeviceContext:
    """Serves one :class:`Device` on one socket, one client at a time, forever.

    ``socket_path`` is where to create the listening socket, or the fd of a
    socket that already listens (inherited from a parent process); the
    context then owns that fd, and :attr:`socket_path` is its address.
    """

    def __init__(
        self,
        device: Device,
        socket_path: str | os.PathLike[str] | int,
        library: Library | None = None,
        *,
        stall_timeout: float = 1.0,
        negotiation_timeout: float = 5.0,
        allowed_uids: frozenset[int] | None = None,
        socket_mode: int = 0o600,
    ) -> None:
        self.device = device
        #: The inherited listening socket served on, if one was given.
        self.listen_fd: int | None = None
        if isinstance(socket_path, int):
            self.listen_fd = socket_path
            self.socket_path = listening_socket_path(socket_path)
        else:
            self.socket_path = Path(socket_path)
        self._lib = library or bindings.load()
        self._ctx: int | None = None
        self._lock = ContextLock()
        # Held by the Trio task that is calling into C through a worker thread
        # (or inline), so that the Trio thread itself never blocks on _lock.
        self._trio_side = trio.Lock()
        # >0 while device code runs on behalf of a libvfio-user callback.
        self._callback_depth = 0
        self._trio_token: trio.lowlevel.TrioToken | None = None
        self._trio_thread: int | None = None
        self._callbacks: list[Any] = []
        self._dma_vaddrs: dict[int, int] = {}
        self._owns_socket = False
        self.stall_timeout = stall_timeout
        #: Seconds a client that connected has to send VERSION before it is dropped.
        self.negotiation_timeout = negotiation_timeout
        self._hung_up = False
        self.allowed_uids = allowed_uids
        self.socket_mode = socket_mode
        self._nursery: trio.Nursery | None = None
        self._quiesced = trio.Event()
        self._declared_threaded = needs_thread(device)
        # MSI-X vectors whose trigger found no eventfd; filled by whichever
        # thread fired them, emptied into the model on the Trio thread.
        self._without_eventfd: collections.deque[int] = collections.deque()
        self.connected = False

    @property
    def threaded(self) -> bool:
        """Served threaded: some handler is ``async``, or a fault plan makes handlers wait."""
        return self._declared_threaded or self.device.faults.needs_thread

    # -- setup ---------------------------------------------------------------

    def _check(self, result: int, what: str) -> int:
        if result < 0:
            code = ctypes.get_errno()
            raise ServeError(f"{self.device.name}: {what} failed: {os.strerror(code)}")
        return result

    def _keep(self, callback: Any) -> Any:
        """Keep a ctypes callback object alive for the context's life (C holds a raw pointer)."""
        self._callbacks.append(callback)
        return callback

    def create(self) -> None:
        """Create and realize the context; the socket exists (mode 0600 if created here) when this returns."""
        lib, device = self._lib, self.device
        if self.listen_fd is not None:
            lib.require("listen_fd")
            ctx = lib.vfu_create_ctx_from_fd(
                VFU_TRANS_SOCK, self.listen_fd, LIBVFIO_USER_FLAG_ATTACH_NB, None, VFU_DEV_TYPE_PCI
            )
            where = f"fd {self.listen_fd} ({self.socket_path})"
        else:
            prepare_socket_path(self.socket_path)
            ctx = lib.vfu_create_ctx(
                VFU_TRANS_SOCK, os.fsencode(self.socket_path), LIBVFIO_USER_FLAG_ATTACH_NB, None, VFU_DEV_TYPE_PCI
            )
            where = str(self.socket_path)
        if not ctx:
            raise ServeError(f"{device.name}: cannot listen on {where}: {os.strerror(ctypes.get_errno())}")
        self._ctx = ctx
        self._owns_socket = self.listen_fd is None
        try:
            self._setup()
        except BaseException:
            self.destroy()
            raise

    def _setup(self) -> None:
        lib, device, ctx = self._lib, self.device, self._ctx
        if self._owns_socket:
            os.chmod(self.socket_path, self.socket_mode)
        # The library logs at syslog levels; asking for debug messages only when
        # vdev's logger wants them keeps a callback into Python off the hot path.
        level = 7 if log.isEnabledFor(logging.DEBUG) else 6
        self._check(lib.vfu_setup_log(ctx, self._keep(bindings.LOG_CB(self._on_log)), level), "vfu_setup_log")
        pci_type = PciType.EXPRESS if device.express else PciType.CONVENTIONAL
        self._check(lib.vfu_pci_init(ctx, pci_type, PCI_HEADER_TYPE_NORMAL, 0), "vfu_pci_init")
        self._setup_region(RegionIndex.CONFIG, device.config.size, VFU_REGION_FLAG_RW | VFU_REGION_FLAG_ALWAYS_CB)
        for bar in device.bars():
            flags = VFU_REGION_FLAG_RW | (0 if bar.spec.kind is BarKind.IO else VFU_REGION_FLAG_MEM)
            areas = [(area.offset, area.size) for area in bar.spec.mapped]
            if len(areas) > 1 and not lib.has("region_fd"):
                log.warning(
                    "%s: BAR%d has %d mapped areas; QEMU refuses it: %s",
                    device.name,
                    bar.index,
                    len(areas),
                    bindings.MissingFixError(lib.path, bindings.FIXES_BY_NAME["region_fd"]),
                )
            self._setup_region(bar.index, bar.size, flags, areas, bar.fd)
        if device.rom_size:
            self._setup_region(RegionIndex.ROM, device.rom_size, VFU_REGION_FLAG_READ)
        self._setup_irqs()
        self._check(lib.vfu_setup_device_reset_cb(ctx, self._keep(bindings.RESET_CB(self._on_reset))), "reset callback")
        if type(device).on_quiesce is not Device.on_quiesce or device.faults.has("quiesce"):
            lib.vfu_setup_device_quiesce_cb(ctx, self._keep(bindings.QUIESCE_CB(self._on_quiesce)))
        self._check(
            lib.vfu_setup_device_dma(
                ctx, self._keep(bindings.DMA_CB(self._on_dma_map)), self._keep(bindings.DMA_CB(self._on_dma_unmap))
            ),
            "vfu_setup_device_dma",
        )
        self._check(lib.vfu_realize_ctx(ctx), "vfu_realize_ctx")

    def _setup_region(
        self, index: int, size: int, flags: int, areas: list[tuple[int, int]] | None = None, fd: int = -1
    ) -> None:
        callback = self._keep(bindings.REGION_ACCESS_CB(self._region_callback(index)))
        iovecs = (bindings.Iovec * len(areas or []))(*[bindings.Iovec(off, size) for off, size in areas or []])
        self._keep(iovecs)
        result = self._lib.vfu_setup_region(
            self._ctx, index, size, callback, flags, iovecs if areas else None, len(areas or []), fd, 0
        )
        self._check(result, f"vfu_setup_region({RegionIndex(index).name})")

    def _setup_irqs(self) -> None:
        for irq_type, count in self.device.irq.vector_counts().items():
            if count:
                self._check(self._lib.vfu_setup_device_nr_irqs(self._ctx, irq_type, count), "vfu_setup_device_nr_irqs")
                if irq_type in (IrqIndex.INTX, IrqIndex.MSI, IrqIndex.MSIX):
                    callback = self._keep(bindings.IRQ_STATE_CB(self._irq_state_callback(irq_type)))
                    self._check(
                        self._lib.vfu_setup_irq_state_callback(self._ctx, irq_type, callback), "irq state callback"
                    )

    def destroy(self) -> None:
        """Close the context and remove the socket file (libvfio-user leaves it behind)."""
        if self._ctx is not None:
            ctx, self._ctx = self._ctx, None
            self._lock.acquire()
            try:
                self._lib.vfu_destroy_ctx(ctx)
            finally:
                self._lock.release()
        if self._owns_socket:
            self._owns_socket = False
            try:
                os.unlink(self.socket_path)
            except FileNotFoundError:
                pass

    # -- serving ---------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Create the context, then accept clients one after another until cancelled."""
        self._trio_token = trio.lowlevel.current_trio_token()
        self._trio_thread = threading.get_ident()
        if self._ctx is None:
            self.create()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self.device.attach_nursery(nursery)
                nursery.start_soon(self._run_device_task)
                task_status.started()
                while True:
                    await self._attach()
                    await self._run_until_disconnect()
        finally:
            self.device.attach_nursery(None)
            self.device.irq.sink = None
            self.device.dma.port = None
            self.destroy()

    async def _run_device_task(self) -> None:
        """The device's own background work; its failure is logged, serving goes on."""
        try:
            await self.device.run()
        except Exception:
            log.exception("%s: the device's run() task failed; it keeps serving without it", self.device.name)

    def _locked(self, function: Callable[..., int], *args: Any) -> tuple[int, int]:
        """Call into the context holding its lock; returns (result, errno)."""
        self._lock.acquire()
        try:
            result = function(self._ctx, *args)
            return result, ctypes.get_errno() if result < 0 else 0
        finally:
            self._lock.release()

    async def _attach(self) -> None:
        while True:
            await trio.lowlevel.wait_readable(self._lib.vfu_get_poll_fd(self._ctx))
            async with self._trio_side, trio.open_nursery() as nursery:
                self._hung_up = False
                nursery.start_soon(self._end_silent_negotiation)
                result, code = await trio.to_thread.run_sync(self._locked, self._lib.vfu_attach_ctx)
                nursery.cancel_scope.cancel()
            if result == 0:
                if self._peer_allowed(self._lib.vfu_get_poll_fd(self._ctx)):
                    break
                while (await self._run_once())[1] not in _DISCONNECTED:
                    pass  # let libvfio-user see the hang-up and listen again
                continue
            if code not in (errno.EAGAIN, errno.EWOULDBLOCK) and not self._hung_up:
                log.warning("%s: a client failed to attach: %s", self.device.name, os.strerror(code))
        self._limit_stalls(self._lib.vfu_get_poll_fd(self._ctx))
        self.connected = True
        self.device.attach_client(self, self)
        log.info("%s: client attached on %s", self.device.name, self.socket_path)

    async def _run_once(self) -> tuple[int, int]:
        """Wait until the client sent something, then let libvfio-user handle it."""
        fd = self._lib.vfu_get_poll_fd(self._ctx)
        await trio.lowlevel.wait_readable(fd)
        set_irqs = self.device.irq.awaiting_eventfds and _next_command(fd) == Command.DEVICE_SET_IRQS
        try:
            if self.threaded:
                async with self._trio_side:
                    return await trio.to_thread.run_sync(self._locked, self._lib.vfu_run_ctx)
            # The inline path runs to completion without yielding, so the lock is
            # taken without the extra trip through the scheduler `async with` costs.
            try:
                self._trio_side.acquire_nowait()
            except trio.WouldBlock:
                await self._trio_side.acquire()
            try:
                return self._locked(self._lib.vfu_run_ctx)
            finally:
                self._trio_side.release()
        finally:
            self._note_missing_eventfds()
            if set_irqs:
                self.device.irq.eventfds_changed()

    async def _end_silent_negotiation(self) -> None:
        """Hang up on a client that connected but sent no VERSION within ``negotiation_timeout``.

        ``vfu_attach_ctx`` accepts a client and waits for its VERSION in one
        blocking call, with no timeout, and an accepted UNIX socket inherits
        none from the listening one; a peer that never speaks would hold the
        device (and this task) for ever.  So when the deadline passes, the
        connection libvfio-user accepted — the socket of this process bound
        to our path that is not the listening one — is shut down, which
        ends the wait like a hang-up.
        """
        await trio.sleep(self.negotiation_timeout)
        path = os.fspath(self.socket_path)
        for entry in os.scandir("/proc/self/fd"):
            try:
                if not os.readlink(entry.path).startswith("socket:"):
                    continue
                duplicate = os.dup(int(entry.name))
            except OSError:
                continue  # closed meanwhile
            with socket.socket(fileno=duplicate) as connection:
                try:
                    if connection.family != socket.AF_UNIX or connection.getsockname() != path:
                        continue
                    if connection.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                        continue
                    connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    continue
            self._hung_up = True
            self.device.events.record("violation", what="no VERSION in time", seconds=self.negotiation_timeout)
            log.warning(
                "%s: dropped a client that sent no VERSION within %g s", self.device.name, self.negotiation_timeout
            )

    def _peer_allowed(self, connection_fd: int) -> bool:
        """Check the client's uid (SO_PEERCRED) against the allow-list; hang up on a stranger.

        libvfio-user owns the connection, so a refused client is shut down
        rather than closed: the library sees the end of the stream and goes
        back to listening.
        """
        if self.allowed_uids is None:
            return True
        duplicate = os.dup(connection_fd)
        with socket.socket(fileno=duplicate) as connection:
            credentials = connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            pid, uid, _gid = struct.unpack("3i", credentials)
            if uid in self.allowed_uids:
                return True
            connection.shutdown(socket.SHUT_RDWR)
        self.device.events.record("violation", what="peer not allowed", uid=uid, pid=pid)
        log.warning("%s: refused a client with uid %d (pid %d): not in the allow-list", self.device.name, uid, pid)
        return False

    def _limit_stalls(self, connection_fd: int) -> None:
        """Bound how long libvfio-user may block reading from this client.

        libvfio-user reads a message body (and a DMA reply) with a blocking
        ``MSG_WAITALL`` receive; a client that sends a header and stops
        would hold it forever — and an inline device holds the Trio thread
        meanwhile.  A receive timeout turns that into a failed read, which
        ends that client's connection and nothing else.
        """
        seconds = int(self.stall_timeout)
        timeval = struct.pack("ll", seconds, int((self.stall_timeout - seconds) * 1e6))
        duplicate = os.dup(connection_fd)
        with socket.socket(fileno=duplicate) as connection:
            connection.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)

    async def _run_until_disconnect(self) -> None:
        try:
            while True:
                result, code = await self._run_once()
                if result >= 0 or code in (errno.EAGAIN, errno.EWOULDBLOCK):
                    continue
                if code == errno.EBUSY:
                    await self._quiesced.wait()
                    continue
                if code in _DISCONNECTED:
                    return
                log.warning("%s: vfu_run_ctx: %s", self.device.name, os.strerror(code))
        finally:
            self.connected = False
            self.device.detach_client()
            log.info("%s: client detached", self.device.name)

    # -- callbacks (worker thread) -------------------------------------------------

    def _to_trio(self, function: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        """Run device code for a callback, with the context lock released meanwhile.

        On the Trio thread (inline devices, and callbacks made while the
        context is destroyed) the coroutine is completed on the spot; from a
        worker thread it is handed to Trio and waited for.
        """
        self._lock.release()
        self._callback_depth += 1
        try:
            if threading.get_ident() == self._trio_thread or self._trio_token is None:
                return complete_now(function(*args))  # type: ignore[arg-type]
            return trio.from_thread.run(function, *args, trio_token=self._trio_token)
        finally:
            self._callback_depth -= 1
            self._lock.acquire()

    def _region_callback(self, region: int) -> Callable[..., int]:
        def access(_ctx: int, buf: Any, count: int, offset: int, is_write: bool) -> int:
            try:
                if is_write:
                    data = ctypes.string_at(buf, count)
                    self._to_trio(self.device.region_write, region, offset, data)
                else:
                    data = self._to_trio(self.device.region_read, region, offset, count)
                    ctypes.memmove(buf, data, count)
                return count
            except BaseException as exc:  # nothing may cross into C
                return self._failed_access(exc, region, offset, count, is_write)

        return access

    def _failed_access(self, exc: BaseException, region: int, offset: int, count: int, is_write: bool) -> int:
        log.error(
            "%s: handler failed on %s of %d bytes at %s: %s: %s",
            self.device.name,
            "write" if is_write else "read",
            count,
            self.device.describe(region, offset),
            type(exc).__name__,
            exc,
            exc_info=not isinstance(exc, (DmaError, InjectedError, trio.Cancelled)),
        )
        self._note_error(region, offset, count, exc)
        bindings.set_c_errno(exc.errno if isinstance(exc, InjectedError) else errno.EIO)
        return -1

    def _note_error(self, region: int, offset: int, count: int, exc: BaseException) -> None:
        try:
            record = functools.partial(
                self.device.events.record,
                "handler_error",
                region=region,
                offset=offset,
                size=count,
                error=f"{type(exc).__name__}: {exc}",
            )
            self._to_trio(self._async_call, record)
        except BaseException:
            log.debug("%s: could not record a handler error (loop closing)", self.device.name)

    def _on_reset(self, _ctx: int, reset_type: int) -> int:
        if reset_type == ResetType.LOST_CONNECTION and not self.connected:
            return 0  # the context is destroyed with no client: nothing was lost
        try:
            self._to_trio(self.device.reset, _RESET_KINDS[ResetType(reset_type)])
            return 0
        except BaseException as exc:
            injected = isinstance(exc, InjectedError)
            log.error("%s: reset (%s) failed: %s", self.device.name, reset_type, exc, exc_info=not injected)
            bindings.set_c_errno(exc.errno if isinstance(exc, InjectedError) else errno.EIO)
            return -1

    def _on_quiesce(self, _ctx: int) -> int:
        """Quiesce now (plain hook) or answer EBUSY and finish in a Trio task (async hook, or a fault)."""
        try:
            fault = self._to_trio(self._async_call, self.device.faults.pick, "quiesce")
            if fault is None and not inspect.iscoroutinefunction(type(self.device).on_quiesce):
                self._to_trio(self._async_call, self.device.on_quiesce)
                self._to_trio(self._async_call, functools.partial(self.device.events.record, "quiesce", done=True))
                return 0
            self._quiesced = trio.Event()
            assert self._nursery is not None
            self._to_trio(self._async_call, self._nursery.start_soon, self._quiesce_later, fault)
        except BaseException as exc:
            log.error("%s: quiesce failed: %s", self.device.name, exc, exc_info=True)
            bindings.set_c_errno(errno.EIO)
            return -1
        bindings.set_c_errno(errno.EBUSY)
        return -1

    async def _quiesce_later(self, fault: Fault | None) -> None:
        """Await the device's quiesce hook (and an injected busy spell), then let libvfio-user go on."""
        self.device.events.record("quiesce", done=False)
        outcome = 0
        try:
            if fault is not None:
                self.device.events.record("fault", **fault.describe())
                await trio.sleep(fault.seconds)
            await call_hook(self.device.on_quiesce)
        except Exception:
            log.exception("%s: on_quiesce failed; the client's request fails", self.device.name)
            outcome = errno.EIO
        self.device.events.record("quiesce", done=True, error=outcome)
        async with self._trio_side:
            result, code = await trio.to_thread.run_sync(self._locked, self._lib.vfu_device_quiesced, outcome)
        if result < 0:
            log.warning("%s: vfu_device_quiesced: %s", self.device.name, os.strerror(code))
        self._quiesced.set()

    def _on_dma_map(self, _ctx: int, info_p: Any) -> None:
        info = info_p.contents
        iova, size, vaddr = info.iova.iov_base or 0, info.iova.iov_len, info.vaddr
        try:
            self._dma_vaddrs[iova] = vaddr or 0
            self._to_trio(self._async_call, self.device.dma.add, DmaRegion(iova, size, bool(vaddr)))
        except BaseException as exc:
            log.error("%s: DMA map callback failed: %s", self.device.name, exc)

    def _on_dma_unmap(self, _ctx: int, info_p: Any) -> None:
        iova = info_p.contents.iova.iov_base or 0
        try:
            self._to_trio(self._async_call, self.device.dma.remove, iova)
            self._dma_vaddrs.pop(iova, None)
        except BaseException as exc:
            log.error("%s: DMA unmap callback failed: %s", self.device.name, exc)

    @staticmethod
    async def _async_call(function: Callable[..., Any], *args: Any) -> Any:
        return function(*args)

    def _irq_state_callback(self, irq_type: IrqIndex) -> Callable[..., None]:
        def state(_ctx: int, start: int, count: int, mask: bool) -> None:
            try:
                self._to_trio(self._async_call, self.device.irq.client_mask, irq_type, start, count, mask)
            except BaseException as exc:
                log.error("%s: IRQ state callback failed: %s", self.device.name, exc)

        return state

    def _on_log(self, _ctx: int, level: int, message: bytes) -> None:
        try:
            text = message.decode()
            level = logging.DEBUG if _ROUTINE_MESSAGES.match(text) else _LOG_LEVELS.get(level, logging.DEBUG)
            log.log(level, "%s: libvfio-user: %s", self.device.name, text)
        except BaseException:
            return

    # -- IrqSink and DmaPort (Trio thread) -------------------------------------------

    def fire(self, irq_type: IrqIndex, vector: int) -> None:
        """Signal the client's eventfd (libvfio-user knows which of INTx/MSI/MSI-X is active).

        ERR and REQ need vdev's libvfio-user patch: without it this raises
        :class:`~vdev.libvfio_user.bindings.MissingFixError` at once, to the
        device code that asked.
        """
        deliver, level = self._lib.vfu_irq_trigger, logging.DEBUG
        args: tuple[int, ...] = (vector,)
        if irq_type in (IrqIndex.ERR, IrqIndex.REQ):
            self._lib.require("irq_trigger_err_req")
            deliver = self._lib.vfu_irq_trigger_err if irq_type is IrqIndex.ERR else self._lib.vfu_irq_trigger_req
            # Rare and asked for on purpose: a lost one deserves a warning.
            args, level = (), logging.WARNING

        def trigger() -> None:
            if self._ctx is None or deliver(self._ctx, *args) >= 0:
                return
            code = ctypes.get_errno()
            if code == errno.ENOENT and irq_type is IrqIndex.MSIX:
                self._without_eventfd.append(vector)
            log.log(
                level, "%s: %s vector %d not delivered: %s", self.device.name, irq_type.name, vector, os.strerror(code)
            )

        self._lock.run_or_defer(trigger)
        self._note_missing_eventfds()

    def _note_missing_eventfds(self) -> None:
        """Tell the model (on the Trio thread) which MSI-X triggers found no eventfd."""
        while self._without_eventfd:
            self.device.irq.no_eventfd(IrqIndex.MSIX, self._without_eventfd.popleft())

    def _direct(self, address: int, size: int) -> int | None:
        """The server-side address of client memory, if the client mapped it with an fd."""
        region = self.device.dma.find(address)
        if region is None or address + size > region.end:
            return None
        base = self._dma_vaddrs.get(region.iova, 0)
        return base + (address - region.iova) if base else None

    async def dma_read(self, address: int, size: int) -> bytes:
        direct = self._direct(address, size)
        if direct is not None:
            return ctypes.string_at(direct, size)
        buffer = ctypes.create_string_buffer(size)
        await self._message_dma(address, size, buffer, False)
        return buffer.raw

    async def dma_write(self, address: int, data: bytes) -> None:
        direct = self._direct(address, len(data))
        if direct is not None:
            ctypes.memmove(direct, data, len(data))
            return
        buffer = ctypes.create_string_buffer(data, len(data))
        await self._message_dma(address, len(data), buffer, True)

    async def _message_dma(self, address: int, size: int, buffer: Any, write: bool) -> None:
        """DMA through DMA_READ/DMA_WRITE messages: a round trip to the client.

        The wait for the client's reply never happens on the Trio thread when
        it can be avoided, because the client may be a Trio task of this
        very process (vdev's own test client).  From background work it
        runs in a worker thread while this context's Trio side is held, so
        ``vfu_run_ctx`` cannot race it for the reply.  Inside a callback the
        worker serving it is parked: a threaded device waits in a worker
        thread too, an inline device — whose handlers must not suspend —
        waits on the Trio thread (so a plain handler doing message DMA needs
        an out-of-process client; make it ``async`` otherwise).
        """
        if self._callback_depth and not self.threaded:
            self._sgl_transfer(address, size, buffer, write)
        elif self._callback_depth:
            await trio.to_thread.run_sync(self._sgl_transfer, address, size, buffer, write)
        else:
            async with self._trio_side:
                await trio.to_thread.run_sync(self._sgl_transfer, address, size, buffer, write)

    def _sgl_transfer(self, address: int, size: int, buffer: Any, write: bool) -> None:
        """Message-based DMA (DMA_READ/DMA_WRITE to the client), holding the context lock."""
        lib = self._lib
        sgl = bindings.DmaSg()
        self._lock.acquire()
        try:
            if self._ctx is None:
                raise DmaError(f"{self.device.name}: device is shutting down")
            prot = 2 if write else 1  # PROT_WRITE / PROT_READ
            if lib.vfu_addr_to_sgl(self._ctx, address, size, ctypes.byref(sgl), 1, prot) < 0:
                raise DmaError(f"{self.device.name}: {address:#x}+{size:#x} is not mapped by the client")
            if not lib.has("sgl_offset"):
                sgl.dma_addr, sgl.offset = sgl.dma_addr + sgl.offset, 0  # see bindings.DmaSg
            transfer = lib.vfu_sgl_write if write else lib.vfu_sgl_read
            if transfer(self._ctx, ctypes.byref(sgl), 1, buffer) < 0:
                raise DmaError(f"{self.device.name}: DMA message failed: {os.strerror(ctypes.get_errno())}")
        finally:
            self._lock.release()


def _next_command(fd: int) -> int | None:
    """The command of the message waiting on ``fd``, read without consuming it (None if unknown)."""
    connection = socket.socket(fileno=fd)
    try:
        data = connection.recv(HEADER_SIZE, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except OSError:
        return None
    finally:
        connection.detach()
    if len(data) < HEADER_SIZE:
        return None
    try:
        return Header.decode(data).command
    except RemoteProtocolError:
        return None  # libvfio-user will refuse the message itself
