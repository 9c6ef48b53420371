"""``vdev.serve`` with several devices: one device's failure stays with that device."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import trio

from vdev import Connect, DeviceEvent, ServeError, serve
from vdev.client import Client, ServerDisconnected, VfioUserError
from vdev_devices.hello import Hello

pytestmark = [pytest.mark.requires("libvfio-user"), pytest.mark.trio]


def break_on_connect(device: Hello) -> None:
    """A listener that raises when a client attaches: the device's serving thread dies of it."""

    def listener(event: DeviceEvent) -> None:
        if isinstance(event, Connect):
            raise RuntimeError("a broken event listener")

    device.events.subscribe(listener)


async def touch(path: Path) -> None:
    """Connect and read once; the broken device hangs up, so either may fail."""
    try:
        async with Client.connect(path) as client:
            await client.read32(0, 0)
    except (OSError, ServerDisconnected, VfioUserError):
        pass


async def gone(path: Path) -> None:
    while await trio.Path(path).exists():
        await trio.sleep(0.01)


async def test_a_device_whose_serving_fails_leaves_the_others_served(vdev_socket_dir: Path) -> None:
    broken, healthy = Hello(ident=0x0BAD), Hello(ident=0x600D)
    break_on_connect(broken)
    broken_path, healthy_path = vdev_socket_dir / "broken.sock", vdev_socket_dir / "healthy.sock"
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            pairs = [(broken, broken_path), (healthy, healthy_path)]
            await nursery.start(functools.partial(serve, pairs, handle_signals=False))
            await touch(broken_path)
            await gone(broken_path)  # the broken device is no longer served
            async with Client.connect(healthy_path) as client:
                await client.enable(memory=True, io=False, master=False)
                assert await client.read32(0, 0) == 0x600D
            nursery.cancel_scope.cancel()


async def test_when_the_last_device_fails_serve_raises_its_error(vdev_socket_dir: Path) -> None:
    broken = Hello()
    break_on_connect(broken)
    path = vdev_socket_dir / "broken.sock"
    with trio.fail_after(30), pytest.raises(BaseExceptionGroup) as caught:
        async with trio.open_nursery() as nursery:
            await nursery.start(functools.partial(serve, [(broken, path)], handle_signals=False))
            await touch(path)
            await trio.sleep_forever()  # serve's failure ends the nursery
    assert caught.group_contains(ServeError, match="the serving thread failed")
