"""A fresh libvfio-user sample server per test, killed afterwards whatever happens."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from vdev.client import Client


@dataclass
class SampleServer:
    """libvfio-user's ``samples/server`` running on ``socket`` (verbose log in ``log``)."""

    socket: Path
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    async def wait_for_log(self, text: str, *, timeout: float = 5) -> None:
        """Wait until the server has logged ``text`` (it logs after acting)."""
        with trio.fail_after(timeout):
            while text not in self.log_text():
                await trio.sleep(0.01)

    async def wait_exit(self, *, timeout: float = 5) -> int:
        with trio.fail_after(timeout):
            while (code := self.process.poll()) is None:
                await trio.sleep(0.01)
        return code


#: ``__SO_ACCEPTCON`` in /proc/net/unix's Flags column: the socket listens.
_LISTENING = 0x10000


def _listening(path: Path) -> bool:
    """Whether a socket bound at ``path`` accepts connections yet.

    The socket file appears at bind(), before listen(); connecting in
    between is refused.  A test connection cannot probe it either: the
    sample serves exactly one client.
    """
    with open("/proc/net/unix") as table:
        next(table)
        for line in table:
            fields = line.split()
            if len(fields) == 8 and fields[7] == str(path):
                return bool(int(fields[3], 16) & _LISTENING)
    return False


@pytest.fixture
async def sample_server(libvfio_user_sample_server: Path) -> AsyncIterator[SampleServer]:
    # A short directory: AF_UNIX paths stop at 108 bytes, pytest's tmp_path
    # for a long test name does not.
    directory = Path(tempfile.mkdtemp(prefix="vdev-", dir="/tmp"))
    socket_path = directory / "sock"
    log = directory / "server.log"
    with log.open("wb") as log_file:
        process = subprocess.Popen(
            [str(libvfio_user_sample_server), "-v", str(socket_path)],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
        )
    try:
        with trio.fail_after(10):
            while not _listening(socket_path):
                if process.poll() is not None:
                    raise RuntimeError(f"sample server exited early:\n{log.read_text()}")
                await trio.sleep(0.01)
        yield SampleServer(socket_path, process, log)
    finally:
        process.kill()
        process.wait()
        shutil.rmtree(directory)


@pytest.fixture
async def client(sample_server: SampleServer) -> AsyncIterator[Client]:
    async with Client.connect(sample_server.socket) as connected:
        yield connected
