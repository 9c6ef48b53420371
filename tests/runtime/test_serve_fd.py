"""``vdev serve`` on a listening socket its parent created: ``--fd N`` and systemd-style socket activation.

The parent binds and listens, then starts the server with the socket as fd 3
(as systemd does: fork, move the socket to fd 3, set ``LISTEN_PID`` to the
child's pid, exec).  QEMU can connect before the server even runs: the
kernel queues the connection on the listening socket.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

from vdev import deps
from vdev.qemu import QemuMachine
from vdev.testing import vfio_user_pci

pytestmark = pytest.mark.requires("libvfio-user")

HELLO = (0x1B36, 0x0F00)

#: What the parent runs in its child: the socket to fd 3, then exec.  ACTIVATION is
#: empty, or "FDS PID" for LISTEN_FDS and LISTEN_PID ("self": the child's own pid).
LAUNCH = """
import os, sys
fd, activation, *command = sys.argv[1:]
os.dup2(int(fd), 3)
if activation:
    fds, pid = activation.split()
    os.environ.update(LISTEN_FDS=fds, LISTEN_PID=str(os.getpid()) if pid == "self" else pid)
os.execv(sys.executable, [sys.executable, "-m", "vdev", *command])
"""
ACTIVATE = "1 self"


@contextmanager
def listening(path: Path) -> Iterator[socket.socket]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen()
        yield listener


def start(
    listener: socket.socket, activation: str, *args: str, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    """``vdev ARGS`` with ``listener`` as its fd 3, and LISTEN_* as ``activation`` says (see LAUNCH)."""
    fd = listener.fileno()
    return subprocess.Popen(
        [sys.executable, "-c", LAUNCH, str(fd), activation, *args],
        pass_fds=[fd],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def run(fd: int, activation: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", LAUNCH, str(fd), activation, *args],
        pass_fds=[fd],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def finish(server: subprocess.Popen[str], *, stop: bool = False) -> tuple[int, str]:
    if stop:
        server.send_signal(signal.SIGTERM)
    try:
        _, stderr = server.communicate(timeout=60)
    finally:
        if server.poll() is None:
            server.kill()
    return server.returncode, stderr


@pytest.mark.requires("qemu")
@pytest.mark.parametrize(
    ("activation", "args"),
    [("", ["serve", "hello", "--fd", "3"]), (ACTIVATE, ["serve", "hello"])],
    ids=["fd", "activate"],
)
async def test_qemu_attaches_to_a_server_on_an_inherited_socket(
    vdev_socket_dir: Path, activation: str, args: Sequence[str]
) -> None:
    path = vdev_socket_dir / "hello.sock"
    with listening(path) as listener:
        server = start(listener, activation, *args)
    try:
        # Generous: QEMU's first request may wait while the server is still starting.
        spec = vfio_user_pci(path, **{"x-msg-timeout": 60_000})
        async with QemuMachine(devices=[spec], startup_timeout=90) as vm:
            function = await (await vm.pci_bus()).find(*HELLO)
            await function.map_bars()
            await function.enable(memory=True, io=False, master=False)
            assert await function.bar_readl(0, 0x00) == 0x48454C4F
    finally:
        status, stderr = finish(server, stop=True)
    assert status == 0, stderr
    assert f"serving hello (hello) on fd 3 ({path})" in stderr
    assert path.exists()  # the parent's socket: the server leaves its name alone


@pytest.mark.parametrize(
    ("activation", "args", "message"),
    [
        ("", ["serve", "hello", "--fd", "97"], "fd 97 is not an open socket"),
        ("", ["serve", "hello", "--fd", "3", "--socket-path", "/tmp/x.sock"], "not allowed with argument"),
        ("2 self", ["serve", "hello"], "socket activation passed 2 sockets"),
        ("1 1", ["serve", "hello"], "one of --socket-path or --fd is required"),  # LISTEN_PID: not for us
    ],
)
def test_bad_inherited_sockets_get_one_line_and_status_2(
    vdev_socket_dir: Path, activation: str, args: list[str], message: str
) -> None:
    with listening(vdev_socket_dir / "x.sock") as listener:
        result = run(listener.fileno(), activation, *args)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and message in lines[0], result.stderr


def test_a_socket_that_does_not_listen_is_refused(vdev_socket_dir: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as unbound:
        result = run(unbound.fileno(), "", "serve", "hello", "--fd", "3")
    assert result.returncode == 2
    assert result.stderr.strip() == "vdev: error: fd 3 is not a listening UNIX stream socket"


@pytest.mark.requires("libvfio-user-unpatched")
def test_without_patch_0007_serving_on_an_fd_fails_naming_the_patch(vdev_socket_dir: Path) -> None:
    env = {**os.environ, "VDEV_LIBVFIO_USER": str(deps.libvfio_user_unpatched_path())}
    with listening(vdev_socket_dir / "hello.sock") as listener:
        server = start(listener, "", "serve", "hello", "--fd", "3", env=env)
    status, stderr = finish(server)
    errors = [line for line in stderr.splitlines() if line.startswith("vdev: error:")]
    assert status == 1 and len(errors) == 1
    assert "0007-Add-vfu_create_ctx_from_fd-serve-on-an-inherited-lis.patch" in errors[0]
