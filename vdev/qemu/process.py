"""One QEMU process in qtest mode, for the length of an ``async with`` block.

Lifetime rules, each learnt the hard way:

* QEMU does not exit when the qtest socket closes, so the harness always
  stops it: SIGTERM, then SIGKILL after ``stop_timeout`` - on success, on
  error and on cancellation alike.
* QEMU explains every failure on stderr, so stderr goes to a log file whose
  tail is attached to any error leaving the block.  The tail is cut where the
  harness began stopping QEMU, so QEMU's "terminating on signal 15" never
  hides the real message.
* A QEMU that exits while nobody expects it cancels the block's body (which
  might be waiting for a reply that will never come) and raises
  :class:`~vdev.qemu.QemuExitedError`.  To let QEMU exit, call
  :meth:`QemuMachine.expect_exit` first, or use :meth:`QemuMachine.quit`.

Example::

    async with QemuMachine(devices=["edu"]) as vm:
        bus = await vm.pci_bus()
        edu = await bus.find(0x1234, 0x11E8)
"""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
from collections.abc import AsyncIterator, Sequence
from contextlib import ExitStack, asynccontextmanager
from pathlib import Path

import trio

from vdev import deps
from vdev.qemu._once import EnteredOnce
from vdev.qemu.cmdline import DeviceSpec, MiB, qemu_command
from vdev.qemu.errors import QemuExitedError, QemuStartError, QmpClosedError
from vdev.qemu.hotplug import hot_unplug
from vdev.qemu.memory import GUEST_RAM_START, GuestMemoryAllocator
from vdev.qemu.pci import PciBus, PciWindows
from vdev.qemu.qmp import QmpClient
from vdev.qemu.qtest import QTestClient

#: How much of QEMU's log is kept once the machine is gone.
_KEPT_LOG_BYTES = 64 * 1024
#: Guest RAM handed out by :attr:`QemuMachine.guest_memory` stays below this,
#: inside the low-RAM region of both q35 and pc whatever the memory size.
_GUEST_ALLOC_LIMIT = 2 << 30


class QemuMachine(EnteredOnce):
    """A QEMU machine driven through qtest and QMP; an async context manager.

    Inside the block, :attr:`qtest` and :attr:`qmp` are connected clients.

    * ``binary``: QEMU, or a wrapper script that replaces itself with QEMU
      (``exec``), since the harness signals this process; defaults to the
      provisioned one.
    * ``machine``: ``q35`` (default) or ``pc``, optionally with ``,options``.
    * ``memory``: guest RAM in bytes, a whole number of MiB; shared (memfd)
      unless ``shared_memory`` is false, because vfio-user DMA needs that.
    * ``devices``: ``-device`` specs, strings or mappings (sent as JSON);
      ``extra_args`` are appended verbatim.
    * ``workdir``: where the sockets and ``qemu.log`` go; by default a fresh
      temporary directory, removed afterwards.  Unix socket paths are
      limited to about 100 bytes.
    """

    def __init__(
        self,
        *,
        binary: str | os.PathLike[str] | None = None,
        machine: str = "q35",
        memory: int = 128 * MiB,
        shared_memory: bool = True,
        devices: Sequence[DeviceSpec] = (),
        extra_args: Sequence[str] = (),
        startup_timeout: float = 10.0,
        stop_timeout: float = 2.0,
        workdir: str | os.PathLike[str] | None = None,
    ) -> None:
        self._binary = binary if binary is not None else deps.qemu_path()
        self._machine = machine
        self._memory = memory
        self._shared_memory = shared_memory
        self._devices = list(devices)
        self._extra_args = list(extra_args)
        self._startup_timeout = startup_timeout
        self._stop_timeout = stop_timeout
        self._workdir = Path(workdir) if workdir is not None else None
        #: Guest RAM for the test's own buffers (DMA, MSI mailboxes).
        self.guest_memory = GuestMemoryAllocator(GUEST_RAM_START, min(memory, _GUEST_ALLOC_LIMIT))
        #: QEMU's full argument vector, once started.
        self.command: list[str] = []
        #: Where QEMU's stdout and stderr go while it runs.
        self.log_path: Path | None = None
        self._process: trio.Process | None = None
        self._qtest: QTestClient | None = None
        self._qmp: QmpClient | None = None
        self._pci_bus: PciBus | None = None
        self._guard = trio.CancelScope()
        self._exited = trio.Event()
        self._ready = False
        self._stopping = False
        self._exit_expected = False
        self._unexpected_exit = False
        self._log_mark: int | None = None
        self._kept_log: bytes | None = None

    # -- the context manager ----------------------------------------------------

    @asynccontextmanager
    async def _lifetime(self) -> AsyncIterator[None]:
        QmpClient.check_library()
        with ExitStack() as resources:
            workdir = self._workdir
            if workdir is None:
                temporary = tempfile.TemporaryDirectory(prefix="vdev-qemu-")
                workdir = Path(resources.enter_context(temporary))
            self.log_path = workdir / "qemu.log"
            log = resources.enter_context(open(self.log_path, "wb"))  # noqa: ASYNC230 - a local file, once
            qtest_listener = await _listen_unix(workdir / "qtest.sock", resources)
            qmp_listener = await _listen_unix(workdir / "qmp.sock", resources)
            self.command = qemu_command(
                self._binary,
                machine=self._machine,
                memory=self._memory,
                shared_memory=self._shared_memory,
                qtest_socket=workdir / "qtest.sock",
                qmp_socket=workdir / "qmp.sock",
                devices=self._devices,
                extra_args=self._extra_args,
            )
            try:
                process = await trio.lowlevel.open_process(
                    self.command, stdin=subprocess.DEVNULL, stdout=log, stderr=log
                )
            except OSError as exc:
                hint = f"; {deps.how_to_provide('VDEV_QEMU')}" if self._binary == deps.qemu_path() else ""
                raise QemuStartError(f"cannot run QEMU {self.command[0]}: {exc.strerror}{hint}") from exc
            self._process = process
            failure: BaseException | None = None
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_exit, process)
                try:
                    with self._guard:
                        await self._connect(nursery, qtest_listener, qmp_listener)
                        yield
                # The body's exception is re-raised outside the nursery, so that
                # it does not come out wrapped in an ExceptionGroup.
                except BaseException as exc:
                    failure = exc
                finally:
                    with trio.CancelScope(shield=True):
                        await self._shutdown(process)
                    nursery.cancel_scope.cancel()
            error = self._outcome(failure)
            if error is not None:
                raise error

    async def _connect(
        self,
        nursery: trio.Nursery,
        qtest_listener: trio.socket.SocketType,
        qmp_listener: trio.socket.SocketType,
    ) -> None:
        try:
            with trio.fail_after(self._startup_timeout):
                qtest_sock, _ = await qtest_listener.accept()
                qmp_sock, _ = await qmp_listener.accept()
                self._qtest = QTestClient(trio.SocketStream(qtest_sock))
                nursery.start_soon(self._qtest.run)
                self._qmp = await QmpClient.connect(socket.socket(fileno=qmp_sock.detach()))
        except trio.TooSlowError:
            raise QemuStartError(
                f"QEMU did not connect within {self._startup_timeout} s\n"
                f"command: {' '.join(self.command)}{self._tail_section()}"
            ) from None
        self._ready = True

    async def _watch_exit(self, process: trio.Process) -> None:
        await process.wait()
        self._exited.set()
        if not (self._stopping or self._exit_expected):
            self._unexpected_exit = True
            self._guard.cancel()

    async def _shutdown(self, process: trio.Process) -> None:
        self._stopping = True
        qemu_leaving = process.poll() is not None or (self._qtest is not None and self._qtest.peer_closed)
        if qemu_leaving and not self._exit_expected:
            self._unexpected_exit = True
        if self._qmp is not None:
            await self._qmp.aclose()
        if self._qtest is not None:
            await self._qtest.aclose()
        assert self.log_path is not None
        if qemu_leaving:
            # Let it finish on its own, so its exit status tells why it left.
            with trio.move_on_after(self._stop_timeout):
                await process.wait()
        self._log_mark = self.log_path.stat().st_size
        if process.poll() is None:
            process.terminate()
            with trio.move_on_after(self._stop_timeout):
                await process.wait()
        if process.poll() is None:
            process.kill()
            await process.wait()
        self._kept_log = self._read_log()

    def _outcome(self, failure: BaseException | None) -> BaseException | None:
        """The exception to leave the block with, if any, decorated with QEMU's stderr."""
        if isinstance(failure, (QemuStartError, QemuExitedError, trio.Cancelled)):
            return failure  # the first two already carry QEMU's stderr
        if not self._ready and (failure is not None or self._unexpected_exit):
            # Whatever broke first (often the QMP handshake with a QEMU that
            # is exiting), the news is that QEMU did not start.
            if self._unexpected_exit:
                what = f"exited with status {self.returncode} before connecting"
            else:
                what = f"failed to start: {failure}"
            error = QemuStartError(f"QEMU {what}\ncommand: {' '.join(self.command)}{self._tail_section()}")
            error.__cause__ = failure
            return error
        if failure is not None:
            if self._unexpected_exit:
                failure.add_note(f"QEMU exited unexpectedly with status {self.returncode}")
            tail = self.stderr_tail()
            if tail:
                failure.add_note(f"QEMU stderr (last lines):\n{tail}")
            return failure
        if self._unexpected_exit:
            returncode = self.returncode
            assert returncode is not None
            return QemuExitedError(
                f"QEMU exited unexpectedly with status {returncode}{self._tail_section()}",
                returncode,
            )
        return None

    # -- QEMU's log ---------------------------------------------------------------

    def _read_log(self) -> bytes:
        assert self.log_path is not None
        with open(self.log_path, "rb") as log:
            end = log.seek(0, os.SEEK_END) if self._log_mark is None else self._log_mark
            start = max(0, end - _KEPT_LOG_BYTES)
            log.seek(start)
            return log.read(end - start)

    def stderr_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines QEMU wrote, up to where the harness stopped it."""
        if self.log_path is None:
            return ""
        data = self._kept_log if self._kept_log is not None else self._read_log()
        text = data.decode(errors="replace").rstrip("\n")
        return "\n".join(text.splitlines()[-lines:])

    def _tail_section(self) -> str:
        tail = self.stderr_tail()
        return f"\nQEMU stderr:\n{tail}" if tail else "\nQEMU wrote nothing to stderr"

    # -- while running --------------------------------------------------------------

    @property
    def qtest(self) -> QTestClient:
        """The qtest client: memory, I/O ports and interrupt lines."""
        if self._qtest is None:
            raise RuntimeError("the machine is not running")
        return self._qtest

    @property
    def qmp(self) -> QmpClient:
        """The QMP client: device_add, resets, queries."""
        if self._qmp is None:
            raise RuntimeError("the machine is not running")
        return self._qmp

    @property
    def pid(self) -> int | None:
        """QEMU's process id once started."""
        return self._process.pid if self._process is not None else None

    @property
    def returncode(self) -> int | None:
        """QEMU's exit status, or ``None`` while it runs (negative: killed by that signal)."""
        return self._process.poll() if self._process is not None else None

    async def pci_bus(self) -> PciBus:
        """PCI helpers placing BARs in the windows QEMU reports; one per machine."""
        if self._pci_bus is None:
            self._pci_bus = PciBus(self.qtest, windows=await PciWindows.query(self.qmp))
        return self._pci_bus

    async def hot_unplug(self, device_id: str) -> None:
        """Hot-unplug PCI device ``device_id`` via ACPI; see :func:`vdev.qemu.hot_unplug`."""
        await hot_unplug(self.qmp, self.qtest, device_id)

    def expect_exit(self) -> None:
        """Declare that QEMU may now exit without that being an error."""
        self._exit_expected = True

    async def wait_exit(self) -> int:
        """Wait for QEMU to exit (expecting it) and return its exit status."""
        self.expect_exit()
        await self._exited.wait()
        returncode = self.returncode
        assert returncode is not None
        return returncode

    async def quit(self) -> int:
        """Ask QEMU to quit through QMP and return its exit status."""
        self.expect_exit()
        try:
            await self.qmp.execute("quit")
        except QmpClosedError:
            pass  # QEMU may hang up before its reply is read
        return await self.wait_exit()


async def _listen_unix(path: Path, resources: ExitStack) -> trio.socket.SocketType:
    """A socket listening at ``path``, closed and removed when ``resources`` closes.

    A stale socket file (a reused ``workdir``) is replaced.
    """
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    resources.callback(sock.close)
    path.unlink(missing_ok=True)  # noqa: ASYNC240 - a local socket path
    await sock.bind(os.fspath(path))
    resources.callback(path.unlink, missing_ok=True)
    sock.listen(1)
    return sock
