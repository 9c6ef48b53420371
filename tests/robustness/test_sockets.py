"""The server's socket: permissions, ownership, peer uids, and shutdown with clients attached."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from vdev.client import Client, ServerDisconnected
from vdev.model.events import Violation
from vdev.runtime import DeviceContext, ServeError
from vdev.testing import served
from vdev_devices.hello import Hello

pytestmark = pytest.mark.requires("libvfio-user")


async def test_socket_is_private_and_removed(vdev_socket_dir: Path) -> None:
    socket = vdev_socket_dir / "hello.sock"
    async with served(Hello(), socket):
        assert socket.stat().st_mode & 0o777 == 0o600
    assert not socket.exists()


async def test_a_live_server_keeps_its_socket(vdev_socket_dir: Path) -> None:
    socket = vdev_socket_dir / "hello.sock"
    async with served(Hello(), socket):
        with pytest.raises(ServeError, match="still running"):
            DeviceContext(Hello(), socket).create()
        async with Client.connect(socket) as client:
            assert await client.config_read(0, 2) == 0x1B36


async def test_a_stale_socket_is_replaced(vdev_socket_dir: Path) -> None:
    import socket as sockets

    path = vdev_socket_dir / "stale.sock"
    leftover = sockets.socket(sockets.AF_UNIX, sockets.SOCK_STREAM)
    leftover.bind(str(path))
    leftover.close()
    async with served(Hello(), path), Client.connect(path) as client:
        assert await client.config_read(0, 2) == 0x1B36


@pytest.mark.parametrize("allowed", [True, False])
async def test_peer_uid_allow_list(vdev_socket_dir: Path, allowed: bool) -> None:
    device = Hello()
    path = vdev_socket_dir / "hello.sock"
    uids = frozenset({os.getuid()} if allowed else {os.getuid() + 4242})
    async with trio.open_nursery() as nursery:
        context = DeviceContext(device, path, allowed_uids=uids)
        await nursery.start(context.serve)
        if allowed:
            async with Client.connect(path) as client:
                assert await client.config_read(0, 2) == 0x1B36
        else:
            with pytest.raises(ServerDisconnected):
                async with Client.connect(path) as client:
                    with trio.fail_after(10):
                        await client.config_read(0, 2)
            refused = [e for e in device.events.of_kind(Violation) if e.what == "peer not allowed"]
            assert refused and refused[0].uid == os.getuid()
        nursery.cancel_scope.cancel()


async def test_a_peer_that_never_speaks_is_dropped_after_the_negotiation_deadline(vdev_socket_dir: Path) -> None:
    """Issue 15: a peer that connected and sent nothing held the device for every other client, for ever."""
    import socket as sockets

    device = Hello()
    path = vdev_socket_dir / "hello.sock"
    silent = sockets.socket(sockets.AF_UNIX, sockets.SOCK_STREAM)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(DeviceContext(device, path, negotiation_timeout=0.5).serve)
            silent.connect(str(path))
            with trio.fail_after(10):
                async with Client.connect(path) as client:
                    assert await client.region_read(7, 0, 2) == b"\x36\x1b"
                # The watchdog records why it hung up from its own thread, under the device's lock:
                # wait for the record rather than expect it the moment the next client is served.
                await device.events.wait_for(Violation)
            nursery.cancel_scope.cancel()
    finally:
        silent.close()  # without the deadline, what unblocks the server
    dropped = [e for e in device.events.of_kind(Violation) if e.what == "no VERSION in time"]
    assert len(dropped) == 1
    assert silent.fileno() == -1


def test_sigterm_with_a_client_attached_exits_cleanly(vdev_socket_dir: Path) -> None:
    path = vdev_socket_dir / "hello.sock"
    server = subprocess.Popen([sys.executable, "-m", "vdev", "serve", "hello", "--socket-path", str(path)])
    try:
        deadline = time.monotonic() + 20
        while not path.exists():
            assert server.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)

        async def attach_then_terminate() -> None:
            async with Client.connect(path) as client:
                assert await client.config_read(0, 2) == 0x1B36
                server.send_signal(signal.SIGTERM)
                with trio.fail_after(10):
                    while server.poll() is None:
                        await trio.sleep(0.01)

        trio.run(attach_then_terminate)
        assert server.returncode == 0
        assert not path.exists()
    finally:
        if server.poll() is None:
            server.kill()
