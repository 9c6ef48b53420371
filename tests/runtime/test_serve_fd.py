"""``vdev serve`` on a listening socket its parent created: ``--fd N`` and systemd-style socket activation.

The parent binds and listens, then starts the server with the socket as fd 3
(as systemd does: fork, move the socket to fd 3, set ``LISTEN_PID`` to the
child's pid, exec).  QEMU can connect before the server even runs: the
kernel queues the connection on the listening socket.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from pathlib import Path

import pytest

from tests.runtime.inherited import ACTIVATE, finish, listening, run, start
from vdev import deps
from vdev.qemu import QemuMachine
from vdev.testing import vfio_user_pci

pytestmark = pytest.mark.requires("libvfio-user")

HELLO = (0x1B36, 0x0F00)


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
