"""One device served through one libvfio-user context: a thread per device, Trio for the rest.

How the C library, Python threads and Trio meet (the design, written where
it lives):

* **A serving thread per device.**  The context is created with
  ``LIBVFIO_USER_FLAG_ATTACH_NB``.  Each device gets one OS thread that
  waits for a client (``poll(2)`` on ``vfu_get_poll_fd()``, fetched again
  after every attach and disconnect, since it changes), attaches it, and
  then spends the connection in vdev's serving loop, which is C
  (:mod:`vdev.libvfio_user.serve_loop`): a blocking receive that peeks at
  the next message, then ``vfu_run_ctx`` under the context lock, over and
  over, with the GIL released.  It comes back to Python only for what
  needs deciding here (a hang-up, a pending quiesce, a SET_IRQS the model
  waits for, work another thread deferred to it, the thread being stopped:
  :meth:`_stop_thread` raises the lock's attention flag and shuts the
  connection down for reading, which ends the receive).  A
  message therefore costs one wake-up of one thread, the library's work
  and the handler — like libvfio-user's C samples — and no interpreter
  round trip.  A device whose client misbehaves (stalls half-way through a
  message, floods it) holds only its own thread.
* **Plain handlers run right there**, in the serving thread, inside the
  library's callback.  The common access (one whole register, see
  :meth:`~vdev.model.device.Device.quick_read`) is served without a
  coroutine; anything else drives the model's coroutine to completion on
  the spot (:func:`complete_now`).
* **``async`` handlers run in Trio**, because only there can they await.
  The callback queues the access for the device's job task (a Trio task
  that sleeps in ``wait_readable`` on an eventfd), then, in one call into
  C, writes that eventfd and blocks on a second one, which the task writes
  (from C too) when the handler has finished: two wake-ups per access, the
  fewest a hand-over allows, no trip through Trio's ``run_sync_soon`` queue
  (which measured slower here), and neither wake-up made while the waker
  holds the interpreter, which on a shared CPU cost switching back and forth
  for it (``serve_loop.c`` has the numbers).  The task
  serves a whole register with an ``async`` hook on its quick lane too
  (:meth:`Device.region_read <vdev.model.device.Device.region_read>`), so
  what an access costs beyond a plain one is the hand-over itself, whose
  floor ``make bench`` measures beside it (``bench/handover.py``).  An awaiting handler
  stalls only its own device.  A BAR is handed over only if one of its
  hooks is ``async`` (config space only if ``on_reset`` is), so a device
  mixing both kinds keeps the fast path for its plain registers.  A fault
  plan that makes accesses wait sends every access of the device to Trio.
* **One lock for device state.**  Device code never runs concurrently
  with other code of the same device: the serving thread holds
  :attr:`Device.lock <vdev.model.device.Device.lock>` around each plain
  handler, and an instrument (:class:`DeviceTasks`) holds it around every
  step of the device's own Trio tasks — :meth:`Device.run`, work started
  with :meth:`Device.start_soon`, the job task running ``async`` handlers.
  One access at a time per device follows from the one serving thread.
  What a handler asks of Trio from the serving thread (starting a task,
  waking a waiter) is passed to the Trio thread by the model.
* **The context lock.**  libvfio-user is not thread-safe per context, so
  every call into a context holds :class:`ContextLock` (a C mutex, so that
  the serving loop takes it without the interpreter), which is re-entrant
  for its holder: a plain handler triggering an interrupt or
  doing message DMA calls straight into the library from inside the
  callback.  An interrupt fired from Trio while another thread holds the
  lock is queued and fired by that thread on release (the serving loop is
  called back to Python for it), so the Trio thread never blocks on it; Trio's other calls into C (quiesce, DMA from
  background work) run in worker threads.  A callback handing an access
  to Trio lets go of the lock until the handler is done.
* libvfio-user tells the server neither which eventfds the client installed
  nor when: a trigger without one fails with ENOENT, and nothing announces
  SET_IRQS.  An MSI-X vector whose trigger failed so is held pending by the
  model; while one is, the serving loop peeks at each message's header
  and, after a SET_IRQS, returns so that the model tries the held vectors again.
* A context listens on a socket path it creates, or on a listening socket
  it is handed (an fd from a parent process or from socket activation).
  The latter, and signalling ERR/REQ, need vdev's libvfio-user patches;
  without them they fail with :class:`~vdev.libvfio_user.bindings.MissingFixError`.
* **Nothing per access that nobody asked for**: access events are built
  only while someone listens (:mod:`vdev.model.events`), fault plans are
  indexed by event kind (:mod:`vdev.model.faults`).
* An exception in a handler, or an access a register's size policy refuses
  with an error (:class:`~vdev.model.registers.AccessRefused`), becomes
  ``-1``/``errno`` for the library (an error reply to that access) and a log
  line naming the device, region, offset and register; it never crosses
  into C, and the device goes on.
"""

from __future__ import annotations

import collections
import ctypes
import errno
import inspect
import logging
import os
import re
import select
import socket
import struct
import threading
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import trio

from vdev import sockets
from vdev.libvfio_user import bindings, serve_loop
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
from vdev.libvfio_user.serve_loop import NativeLock, ServeStatus
from vdev.model.bars import BarKind
from vdev.model.device import Device, ResetKind
from vdev.model.dma import DmaError, DmaMapping
from vdev.model.events import FaultInjected, HandlerError, NegotiationTimeout, PeerRefused, Quiesce
from vdev.model.faults import DeviceFault, InjectedError
from vdev.model.registers import AccessRefused, call_hook
from vdev.protocol.constants import IrqIndex, RegionIndex
from vdev.protocol.header import Command

log = logging.getLogger("vdev")

#: The model's names for libvfio-user's reset reasons.
_RESET_KINDS = {
    ResetType.DEVICE: ResetKind.DEVICE,
    ResetType.FLR: ResetKind.FLR,
    ResetType.LOST_CONNECTION: ResetKind.LOST_CONNECTION,
}

#: Little-endian integers of the sizes a register may have, to read a written value out of the
#: library's buffer and store a read one into it without a foreign call (cheaper than memmove).
_WORDS: dict[int, Any] = {
    1: ctypes.c_uint8,
    2: ctypes.c_uint16.__ctype_le__,
    4: ctypes.c_uint32.__ctype_le__,
    8: ctypes.c_uint64.__ctype_le__,
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
    """Serialises calls into one libvfio-user context; re-entrant for its holder, never blocks Trio.

    Re-entrant so that a handler running inside a callback (the holder's
    thread) may call into the same context: trigger an interrupt, do
    message DMA.  The mutex itself is C's (:class:`NativeLock`), because
    the serving loop takes it for every message without the interpreter;
    what is deferred to the holder is kept here, and the holder's serving
    loop is told to come back to Python for it by the lock's attention flag.
    """

    def __init__(self) -> None:
        self.native = NativeLock()
        self._deferred: collections.deque[Callable[[], None]] = collections.deque()
        self.acquire = self.native.acquire

    def release(self) -> None:
        """Run what was deferred while we held the lock, then let go once."""
        native = self.native
        while True:
            while self._deferred:
                self._deferred.popleft()()
            native.release()
            # A call deferred after the queue was drained, by a thread that found us
            # holding the lock, is ours to run if the lock is free now.
            if not self._deferred or not native.try_acquire():
                return

    @contextmanager
    def held(self) -> Iterator[None]:
        self.acquire()
        try:
            yield
        finally:
            self.release()

    def run_or_defer(self, call: Callable[[], None]) -> None:
        """Run ``call`` now if the context is free (or ours), else when its holder releases it.

        A holder in the C serving loop releases without looking at the queue,
        so deferring raises attention to bring it back to Python; and if the
        holder let go between our attempt and the append, the second attempt
        takes the lock and runs the queue here.
        """
        native = self.native
        if native.try_acquire():
            try:
                call()
            finally:
                self.release()
            return
        self._deferred.append(call)
        native.raise_attention()
        if native.try_acquire():
            self.release()

    def run_deferred(self) -> None:
        """Run what other threads deferred (the serving loop returned for attention)."""
        self.native.take_attention()
        if self._deferred:
            self.acquire()
            self.release()


class HandlerSuspendedError(RuntimeError):
    """A handler run outside Trio awaited something that really waits."""


def complete_now(coroutine: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine that is not expected to wait, to completion, right here.

    Plain handlers are called through the model's ``async`` plumbing, which
    finishes on the first step when nothing in it really waits.
    """
    try:
        coroutine.send(None)
    except StopIteration as finished:
        return finished.value
    coroutine.close()
    raise HandlerSuspendedError(
        "a handler awaited outside Trio; make that handler `async def` so its accesses are run in Trio"
    )


def trio_regions(device: Device) -> frozenset[int]:
    """The regions whose accesses must run in Trio: those reaching an ``async`` hook."""
    regions = set()
    for bar in device.bars():
        hooks = [*bar.registers.read_hooks.values(), *bar.registers.write_hooks.values(), bar.raw_read, bar.raw_write]
        if any(inspect.iscoroutinefunction(hook) for hook in hooks if hook is not None):
            regions.add(bar.index)
    if inspect.iscoroutinefunction(device.on_reset):
        regions.add(RegionIndex.CONFIG)  # an FLR written to config space resets the device
    return frozenset(regions)


class DeviceTasks(trio.abc.Instrument):
    """Holds each device's lock around every step of that device's Trio tasks.

    A device's tasks are those of the nursery its context serves it in, and
    their descendants.  One instrument per Trio run (see :func:`device_tasks`).
    Trio calls ``task_exited`` before ``after_task_step``, so the lock taken
    for a step is remembered for that step, not looked up again.
    """

    def __init__(self) -> None:
        self._nurseries: dict[trio.Nursery, threading.RLock] = {}
        self._locks: dict[trio.lowlevel.Task, threading.RLock] = {}
        self._held: threading.RLock | None = None

    def adopt(self, nursery: trio.Nursery, lock: threading.RLock) -> None:
        """Tasks spawned in ``nursery`` (and their children) hold ``lock`` while they run."""
        self._nurseries[nursery] = lock

    def forget(self, nursery: trio.Nursery) -> None:
        self._nurseries.pop(nursery, None)

    def task_spawned(self, task: trio.lowlevel.Task) -> None:
        nursery = task.parent_nursery
        if nursery is None:
            return
        lock = self._nurseries.get(nursery)
        if lock is None and nursery.parent_task is not None:
            lock = self._locks.get(nursery.parent_task)
        if lock is not None:
            self._locks[task] = lock

    def task_exited(self, task: trio.lowlevel.Task) -> None:
        self._locks.pop(task, None)

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        lock = self._locks.get(task)
        if lock is not None:
            lock.acquire()
            self._held = lock

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if self._held is not None:
            self._held.release()
            self._held = None


_DEVICE_TASKS: trio.lowlevel.RunVar[DeviceTasks] = trio.lowlevel.RunVar("vdev_device_tasks")


def device_tasks() -> DeviceTasks:
    """This Trio run's :class:`DeviceTasks` instrument, installed on first use."""
    try:
        return _DEVICE_TASKS.get()
    except LookupError:
        instrument = DeviceTasks()
        trio.lowlevel.add_instrument(instrument)
        _DEVICE_TASKS.set(instrument)
        return instrument


class _Job:
    """Device code handed from a callback to the device's Trio task, and what came of it."""

    __slots__ = ("args", "error", "finished", "function", "value")

    def __init__(self, function: Callable[..., Coroutine[Any, Any, Any]], args: tuple[Any, ...]) -> None:
        self.function = function
        self.args = args
        self.value: Any = None
        self.error: BaseException | None = None
        self.finished = False

    def outcome(self) -> Any:
        """The job's value, or its exception raised here."""
        if self.error is not None:
            raise self.error
        return self.value


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
        self._serve_loop = serve_loop.load()
        self._run_address: int = ctypes.cast(self._lib.cdll.vfu_run_ctx, ctypes.c_void_p).value or 0
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
        self._trio_regions = trio_regions(device)
        self._thread: threading.Thread | None = None
        self._thread_failure: BaseException | None = None
        self._stopping = False
        self._wake_fd = -1
        # The connection being served, as a socket of our own (see _serve_client).
        self._connection: socket.socket | None = None
        self._connection_lock = threading.Lock()
        # Set while no asynchronous quiesce is pending (the serving thread waits on it).
        self._quiesced = threading.Event()
        self._quiesced.set()
        # Jobs for the device's job task, the eventfd that wakes it, and the one it
        # signals when a job is done (one hand-over at a time waits on that).
        self._jobs: collections.deque[_Job] = collections.deque()
        self._jobs_lock = threading.Lock()
        self._jobs_closed = True
        self._jobs_fd = -1
        self._done_fd = -1
        self._handover_lock = threading.Lock()
        # MSI-X vectors whose trigger found no eventfd; filled by whichever
        # thread fired them, emptied into the model under the device's lock.
        self._without_eventfd: collections.deque[int] = collections.deque()
        self.connected = False

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

    # -- serving (Trio side) ---------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Create the context, then accept clients one after another until cancelled."""
        self._trio_token = trio.lowlevel.current_trio_token()
        self._trio_thread = threading.get_ident()
        if self._ctx is None:
            self.create()
        tasks = device_tasks()
        thread_exited = trio.Event()
        # Both outlive the job task and the serving thread, so neither ever writes to a closed fd.
        self._jobs_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._done_fd = os.eventfd(0, os.EFD_CLOEXEC)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                tasks.adopt(nursery, self.device.lock)
                self.device.attach_nursery(nursery)
                nursery.start_soon(self._run_device_task)
                # Open for jobs before the serving thread starts; the job task closes it when it ends.
                self._jobs_closed = False
                nursery.start_soon(self._run_jobs)
                try:
                    self._start_thread(thread_exited)
                    task_status.started()
                    await thread_exited.wait()
                    raise ServeError(f"{self.device.name}: the serving thread failed") from self._thread_failure
                finally:
                    with trio.CancelScope(shield=True):
                        await self._stop_thread(thread_exited)
            tasks.forget(nursery)
        finally:
            self.device.attach_nursery(None)
            self.device.irq.sink = None
            self.device.dma.port = None
            self.destroy()
            for fd in (self._jobs_fd, self._done_fd):
                os.close(fd)
            self._jobs_fd = self._done_fd = -1

    async def _run_device_task(self) -> None:
        """The device's own background work; its failure is logged, serving goes on."""
        try:
            await self.device.run()
        except Exception:
            log.exception("%s: the device's run() task failed; it keeps serving without it", self.device.name)

    def _start_thread(self, exited: trio.Event) -> None:
        self._stopping = False
        self._wake_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        token = self._trio_token
        assert token is not None

        def serving_thread() -> None:
            try:
                self._serve_clients()
            except BaseException as exc:
                self._thread_failure = exc
                log.exception("%s: the serving thread failed", self.device.name)
            finally:
                try:
                    token.run_sync_soon(exited.set)
                except trio.RunFinishedError:
                    pass

        self._thread = threading.Thread(target=serving_thread, name=f"vdev {self.device.name}", daemon=True)
        self._thread.start()

    async def _stop_thread(self, exited: trio.Event) -> None:
        """Wake the serving thread and wait until it has ended (at most a stalled client's timeout)."""
        if self._thread is None:
            return
        self._stopping = True
        os.eventfd_write(self._wake_fd, 1)  # the wait for a client
        self._lock.native.raise_attention()  # the serving loop, once its receive returns...
        with self._connection_lock:
            if self._connection is not None:
                with suppress(OSError):  # a connection the client already ended is ended
                    self._connection.shutdown(socket.SHUT_RD)  # ... which this makes it do now
        self._quiesced.set()
        await exited.wait()
        self._thread = None
        os.close(self._wake_fd)
        self._wake_fd = -1

    async def _run_jobs(self) -> None:
        """The device's job task: runs the ``async`` handlers callbacks hand over, one at a time.

        It sleeps in ``wait_readable`` on an eventfd that a callback writes
        after queueing a job: one wake-up of the Trio thread per job, and
        the task itself is what the wake-up reschedules.
        """
        try:
            while True:
                await trio.lowlevel.wait_readable(self._jobs_fd)
                try:
                    os.eventfd_read(self._jobs_fd)
                except BlockingIOError:
                    continue
                while self._jobs:
                    job = self._jobs.popleft()
                    try:
                        value = await job.function(*job.args)
                    except BaseException as exc:
                        self._finish(job, None, exc)
                        if not isinstance(exc, Exception):
                            raise  # cancelled: the device is shutting down
                    else:
                        self._finish(job, value)
        finally:
            with self._jobs_lock:
                self._jobs_closed = True
                while self._jobs:
                    self._finish(self._jobs.popleft(), None, ServeError(f"{self.device.name} is shutting down"))

    def _finish(self, job: _Job, value: Any, error: BaseException | None = None) -> None:
        """Record a job's outcome and wake the thread waiting for it (see :meth:`_hand_over`)."""
        job.value, job.error, job.finished = value, error, True
        self._serve_loop.wake(self._done_fd)

    # -- serving (the device's thread) -------------------------------------------------

    def _wait_readable(self, fd: int) -> bool:
        """Block until ``fd`` is readable; False if the thread is being stopped instead."""
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        poller.register(self._wake_fd, select.POLLIN)
        poller.poll()
        return not self._stopping

    def _locked(self, function: Callable[..., int], *args: Any) -> tuple[int, int]:
        """Call into the context holding its lock; returns (result, errno)."""
        with self._lock.held():
            result = function(self._ctx, *args)
            return result, ctypes.get_errno() if result < 0 else 0

    def _serve_clients(self) -> None:
        """The serving thread: attach clients one after another and serve each until it leaves."""
        while not self._stopping:
            if self._attach():
                self._serve_client()

    def _attach(self) -> bool:
        """Wait for a client and attach it; False if none could be (or the thread is stopping)."""
        if not self._wait_readable(self._lib.vfu_get_poll_fd(self._ctx)):
            return False
        self._hung_up = False
        # vfu_attach_ctx waits for the client's VERSION with no timeout of its own.
        watchdog = threading.Timer(self.negotiation_timeout, self._end_silent_negotiation)
        watchdog.start()
        try:
            result, code = self._locked(self._lib.vfu_attach_ctx)
        finally:
            watchdog.cancel()
        if result < 0:
            if code not in (errno.EAGAIN, errno.EWOULDBLOCK) and not self._hung_up:
                log.warning("%s: a client failed to attach: %s", self.device.name, os.strerror(code))
            return False
        connection = self._lib.vfu_get_poll_fd(self._ctx)
        if not self._peer_allowed(connection):
            while self._wait_readable(connection) and self._locked(self._lib.vfu_run_ctx)[1] not in _DISCONNECTED:
                pass  # let libvfio-user see the hang-up and listen again
            return False
        self._limit_stalls(connection)
        with self.device.lock:
            self.connected = True
            self.device.attach_client(self, self)
        log.info("%s: client attached on %s", self.device.name, self.socket_path)
        return True

    def _serve_client(self) -> None:
        """Serve the attached client's messages until it disconnects.

        The loop itself runs in C (:mod:`vdev.libvfio_user.serve_loop`) and
        comes back here only for what needs deciding in Python.
        """
        ctx = self._ctx
        assert ctx is not None
        connection = self._lib.vfu_get_poll_fd(ctx)
        serve, run, lock, irq = self._serve_loop.serve, self._run_address, self._lock, self.device.irq
        with self._connection_lock:
            # A socket of our own on the connection, for _stop_thread to shut down:
            # libvfio-user may close its fd (and the number be reused) at any time.
            self._connection = socket.socket(fileno=os.dup(connection))
        try:
            while not self._stopping:
                status = serve(run, ctx, connection, lock.native.address, irq.awaiting_eventfds)
                if self._stopping:
                    return
                if status > 0 or self._without_eventfd:
                    lock.run_deferred()
                    with self.device.lock:
                        self._note_missing_eventfds()
                        if status == ServeStatus.SET_IRQS:
                            irq.eventfds_changed()
                    continue
                code = -status
                if code == errno.EBUSY:
                    self._quiesced.wait()
                    continue
                if code in _DISCONNECTED:
                    return
                log.warning("%s: vfu_run_ctx: %s", self.device.name, os.strerror(code))
                if self._lib.vfu_get_poll_fd(ctx) != connection:
                    return  # the library dropped the client itself
        finally:
            with self._connection_lock:
                self._connection.close()
                self._connection = None
            with self.device.lock:
                self.connected = False
                self.device.detach_client()
            log.info("%s: client detached", self.device.name)

    def _end_silent_negotiation(self) -> None:
        """Hang up on a client that connected but sent no VERSION within ``negotiation_timeout``.

        ``vfu_attach_ctx`` accepts a client and waits for its VERSION in one
        blocking call, with no timeout, and an accepted UNIX socket inherits
        none from the listening one; a peer that never speaks would hold the
        device (and its serving thread) for ever.  So when the deadline
        passes (this runs in a timer thread started for each attach), the
        connection libvfio-user accepted — the socket of this process bound
        to our path that is not the listening one — is shut down, which
        ends the wait like a hang-up.
        """
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
            with self.device.lock:
                self.device.events.record(NegotiationTimeout(seconds=self.negotiation_timeout))
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
        with self.device.lock:
            self.device.events.record(PeerRefused(uid=uid, pid=pid))
        log.warning("%s: refused a client with uid %d (pid %d): not in the allow-list", self.device.name, uid, pid)
        return False

    def _limit_stalls(self, connection_fd: int) -> None:
        """Bound how long libvfio-user may block reading from this client.

        libvfio-user reads a message body (and a DMA reply) with a blocking
        ``MSG_WAITALL`` receive; a client that sends a header and stops
        would hold the serving thread forever, and with it the device (and
        its shutdown).  A receive timeout turns that into a failed read,
        which ends that client's connection and nothing else.
        """
        seconds = int(self.stall_timeout)
        timeval = struct.pack("ll", seconds, int((self.stall_timeout - seconds) * 1e6))
        duplicate = os.dup(connection_fd)
        with socket.socket(fileno=duplicate) as connection:
            connection.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)

    # -- callbacks (the thread calling into the library) ------------------------------

    def _run_device_code(self, in_trio: bool, function: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> Any:
        """Run device code for a callback: here under the device's lock, or handed to Trio.

        Handed to Trio (``in_trio``) it runs in the device's job task while
        this thread waits with the context lock let go, so the handler may
        await, trigger interrupts and do DMA.  Callbacks made on the Trio
        thread itself (while the context is destroyed) complete on the spot.
        """
        if in_trio and threading.get_ident() != self._trio_thread and self._trio_token is not None:
            return self._hand_over(_Job(function, args))
        with self.device.lock:
            return complete_now(function(*args))

    def _hand_over(self, job: _Job) -> Any:
        """Run ``job`` in the device's job task and wait for it, the context lock let go meanwhile.

        The wake-up and the wait are one call into C, and the job task's
        wake-up back is C too (:meth:`_finish`), so neither thread is woken
        while the other holds the interpreter (see ``serve_loop.c``).  One
        hand-over at a time shares the done eventfd; a signal left by a
        hand-over that gave up is told from ours by ``job.finished``.
        """
        wake_and_wait = self._serve_loop.wake_and_wait
        with self._handover_lock:
            with self._jobs_lock:
                if self._jobs_closed:
                    raise ServeError(f"{self.device.name} is shutting down")
                self._jobs.append(job)
            # Let go of the context for the handler's own calls (callbacks hold it
            # exactly once: whoever called into the library took it once).
            self._lock.release()
            try:
                wake_fd = self._jobs_fd
                while not job.finished:
                    code = wake_and_wait(wake_fd, self._done_fd)
                    if code < 0:
                        raise OSError(-code, f"waiting for an async handler: {os.strerror(-code)}")
                    wake_fd = -1
            finally:
                self._lock.acquire()
        return job.outcome()

    def _region_callback(self, region: int) -> Callable[..., int]:
        device = self.device
        hold, let_go = device.lock.acquire, device.lock.release  # cheaper than `with` on this path
        quick_read, quick_write = device.quick_read, device.quick_write
        string_at, memmove = ctypes.string_at, ctypes.memmove
        declared_async = region in self._trio_regions

        def access(_ctx: int, buf: int, count: int, offset: int, is_write: bool) -> int:
            try:
                if declared_async or device.faults.needs_thread:
                    if is_write:
                        self._run_device_code(True, device.region_write, region, offset, string_at(buf, count))
                    else:
                        memmove(buf, self._run_device_code(True, device.region_read, region, offset, count), count)
                    return count
                word = _WORDS.get(count)  # a register-sized access may take a quick lane
                hold()
                try:
                    if is_write:
                        if word is None or not quick_write(region, offset, count, word.from_address(buf).value):
                            complete_now(device.region_write(region, offset, string_at(buf, count)))
                    else:
                        value = None if word is None else quick_read(region, offset, count)
                        if word is None or value is None:
                            memmove(buf, complete_now(device.region_read(region, offset, count)), count)
                        else:
                            word.from_address(buf).value = value
                finally:
                    let_go()
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
            exc_info=not isinstance(exc, (AccessRefused, DmaError, InjectedError, trio.Cancelled, ServeError)),
        )
        try:
            with self.device.lock:
                self.device.events.record(
                    HandlerError(region=region, offset=offset, size=count, error=f"{type(exc).__name__}: {exc}")
                )
        except BaseException:
            log.debug("%s: could not record a handler error", self.device.name)
        bindings.set_c_errno(exc.errno if isinstance(exc, InjectedError) else errno.EIO)
        return -1

    def _on_reset(self, _ctx: int, reset_type: int) -> int:
        if reset_type == ResetType.LOST_CONNECTION and not self.connected:
            return 0  # the context is destroyed with no client: nothing was lost
        try:
            in_trio = inspect.iscoroutinefunction(self.device.on_reset) or self.device.faults.needs_thread
            self._run_device_code(in_trio, self.device.reset, _RESET_KINDS[ResetType(reset_type)])
            return 0
        except BaseException as exc:
            injected = isinstance(exc, InjectedError)
            log.error("%s: reset (%s) failed: %s", self.device.name, reset_type, exc, exc_info=not injected)
            bindings.set_c_errno(exc.errno if isinstance(exc, InjectedError) else errno.EIO)
            return -1

    def _on_quiesce(self, _ctx: int) -> int:
        """Quiesce now (plain hook) or answer EBUSY and finish in a Trio task (async hook, or a fault)."""
        try:
            with self.device.lock:
                fault = self.device.faults.pick("quiesce")
                if fault is None and not inspect.iscoroutinefunction(self.device.on_quiesce):
                    self.device.on_quiesce()
                    self.device.events.record(Quiesce(done=True))
                    return 0
            assert self._nursery is not None and self._trio_token is not None
            self._quiesced.clear()
            self.device.call_soon(self._nursery.start_soon, self._quiesce_later, fault)
        except BaseException as exc:
            log.error("%s: quiesce failed: %s", self.device.name, exc, exc_info=True)
            bindings.set_c_errno(errno.EIO)
            return -1
        bindings.set_c_errno(errno.EBUSY)
        return -1

    async def _quiesce_later(self, fault: DeviceFault | None) -> None:
        """Await the device's quiesce hook (and an injected busy spell), then let libvfio-user go on."""
        self.device.events.record(Quiesce(done=False))
        outcome_errno = 0
        try:
            if fault is not None:
                self.device.events.record(FaultInjected(fault=fault))
                await trio.sleep(fault.seconds)
            await call_hook(self.device.on_quiesce)
        except Exception:
            log.exception("%s: on_quiesce failed; the client's request fails", self.device.name)
            outcome_errno = errno.EIO
        self.device.events.record(Quiesce(done=True, error=outcome_errno))
        try:
            result, code = await trio.to_thread.run_sync(self._locked, self._lib.vfu_device_quiesced, outcome_errno)
        finally:
            self._quiesced.set()
        if result < 0:
            log.warning("%s: vfu_device_quiesced: %s", self.device.name, os.strerror(code))

    def _on_dma_map(self, _ctx: int, info_p: Any) -> None:
        info = info_p.contents
        iova, size, vaddr = info.iova.iov_base or 0, info.iova.iov_len, info.vaddr
        try:
            self._dma_vaddrs[iova] = vaddr or 0
            with self.device.lock:
                self.device.dma.add(DmaMapping(iova, size, bool(vaddr)))
        except BaseException as exc:
            log.error("%s: DMA map callback failed: %s", self.device.name, exc)

    def _on_dma_unmap(self, _ctx: int, info_p: Any) -> None:
        iova = info_p.contents.iova.iov_base or 0
        try:
            with self.device.lock:
                self.device.dma.remove(iova)
            self._dma_vaddrs.pop(iova, None)
        except BaseException as exc:
            log.error("%s: DMA unmap callback failed: %s", self.device.name, exc)

    def _irq_state_callback(self, irq_type: IrqIndex) -> Callable[..., None]:
        def state(_ctx: int, start: int, count: int, mask: bool) -> None:
            try:
                with self.device.lock:
                    self.device.irq.client_mask(irq_type, start, count, mask)
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
                self._lock.native.raise_attention()
            log.log(
                level, "%s: %s vector %d not delivered: %s", self.device.name, irq_type.name, vector, os.strerror(code)
            )

        self._lock.run_or_defer(trigger)
        self._note_missing_eventfds()

    def _note_missing_eventfds(self) -> None:
        """Tell the model which MSI-X triggers found no eventfd (device code calls this, so under its lock)."""
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

        Inside a plain handler (not on the Trio thread: the serving thread,
        in a callback, holding the context lock) the transfer is made right
        there.
        Anywhere else — an ``async`` handler, background work — it runs in
        a worker thread, never on the Trio thread, because the client may
        be a Trio task of this very process (vdev's own test client); the
        worker takes the context lock, so the serving thread cannot race it
        for the client's reply.
        """
        if threading.get_ident() != self._trio_thread:
            self._sgl_transfer(address, size, buffer, write)
        else:
            await trio.to_thread.run_sync(self._sgl_transfer, address, size, buffer, write)

    def _sgl_transfer(self, address: int, size: int, buffer: Any, write: bool) -> None:
        """Message-based DMA (DMA_READ/DMA_WRITE to the client), holding the context lock."""
        lib = self._lib
        sgl = bindings.DmaSg()
        with self._lock.held():
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
