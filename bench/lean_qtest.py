"""A lean qtest driver for the trapped-access benchmarks: blocking stdlib sockets, no event loop.

vdev's own qtest client (:mod:`vdev.qemu.qtest`) is a Trio client built for
tests; here it tops out near 4,000 round trips/s, which is below what
libvfio-user's C sample answers, so a benchmark driven by it measures the
client.  This driver sends one line and reads one line per access, blocking
(two system calls), and does nothing else: the bare qtest round trip it
achieves is reported as the floor of row 1, and must be well above the
fastest server's rate.

Under qtest no firmware runs, so the driver programs the one BAR it needs
through configuration cycles on ports ``0xcf8``/``0xcfc``, as firmware
would: it puts the device at a fixed slot, gives its I/O BAR an address and
turns on I/O decoding.
"""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType

from vdev import deps
from vdev.qemu.cmdline import MiB, qemu_command
from vdev.testing import vfio_user_pci

#: The PCI slot (bus 0, function 0) the benchmark device is placed in.
SLOT = 4
#: Where the device's I/O BAR is placed (the start of SeaBIOS's I/O window).
IO_BASE = 0xC000
#: A guest-RAM address for the bare round trip (a read no device answers).
RAM_ADDRESS = 0x1000

_COMMAND_IO = 0x1
_COMMAND = 0x04
_BAR0 = 0x10


class QTestFailed(RuntimeError):
    """QEMU answered a qtest command with something other than ``OK``."""


class LeanQemu:
    """QEMU in qtest mode with one vfio-user device, driven line by line; a context manager."""

    def __init__(self, device_socket: Path, *, startup_timeout: float = 10.0) -> None:
        self._device_socket = device_socket
        self._startup_timeout = startup_timeout
        self._workdir = tempfile.TemporaryDirectory(prefix="vdev-lean-")
        self._process: subprocess.Popen[bytes] | None = None
        self._qtest: socket.socket | None = None
        self._qmp: socket.socket | None = None
        self._lines = None

    def __enter__(self) -> LeanQemu:
        workdir = Path(self._workdir.name)
        listeners = {}
        for name in ("qtest", "qmp"):
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(os.fspath(workdir / f"{name}.sock"))
            listener.listen(1)
            listener.settimeout(self._startup_timeout)
            listeners[name] = listener
        command = qemu_command(
            deps.qemu_path(),
            machine="q35",
            memory=128 * MiB,
            shared_memory=False,
            qtest_socket=workdir / "qtest.sock",
            qmp_socket=workdir / "qmp.sock",
            devices=[vfio_user_pci(self._device_socket, addr=f"{SLOT:#x}")],
        )
        log = open(workdir / "qemu.log", "wb")  # noqa: SIM115 - QEMU's stdout/stderr for its lifetime
        try:
            self._process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
            self._qtest, _ = listeners["qtest"].accept()
            # QEMU connects to the QMP socket and waits there; it is never spoken to.
            self._qmp, _ = listeners["qmp"].accept()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        finally:
            log.close()
            for listener in listeners.values():
                listener.close()
        self._qtest.settimeout(None)
        self._lines = self._qtest.makefile("rb")
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        for resource in (self._lines, self._qtest, self._qmp):
            if resource is not None:
                resource.close()
        if self._process is not None:
            self._process.kill()
            self._process.wait()
        self._workdir.cleanup()

    def command(self, line: bytes) -> bytes:
        """Send one command line (with its ``\\n``); return QEMU's reply line."""
        assert self._qtest is not None and self._lines is not None
        self._qtest.sendall(line)
        reply = self._lines.readline()
        if not reply.startswith(b"OK"):
            raise QTestFailed(f"{line!r}: {reply!r}")
        return reply

    def _config_address(self, offset: int) -> bytes:
        return f"outl 0xcf8 {0x8000_0000 | SLOT << 11 | offset:#x}\n".encode()

    def config_read(self, offset: int) -> int:
        self.command(self._config_address(offset))
        return int(self.command(b"inl 0xcfc\n").split()[1], 16)

    def config_write(self, offset: int, value: int) -> None:
        self.command(self._config_address(offset))
        self.command(f"outl 0xcfc {value:#x}\n".encode())

    def enable_io_bar(self, index: int) -> int:
        """Place I/O BAR ``index`` at :data:`IO_BASE`, turn on I/O decoding; returns the port."""
        if self.config_read(0) & 0xFFFF == 0xFFFF:
            raise QTestFailed(f"no device in slot {SLOT}")
        self.config_write(_BAR0 + 4 * index, IO_BASE)
        self.config_write(_COMMAND, self.config_read(_COMMAND) & 0xFFFF | _COMMAND_IO)
        return IO_BASE

    def repeat(self, line: bytes, count: int) -> None:
        """Send ``line`` ``count`` times, each after the previous reply (the measured loop)."""
        assert self._qtest is not None and self._lines is not None
        send, readline = self._qtest.sendall, self._lines.readline
        for _ in range(count):
            send(line)
            if not readline().startswith(b"OK"):
                raise QTestFailed(f"{line!r} failed")
