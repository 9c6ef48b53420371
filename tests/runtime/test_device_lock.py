"""A handler never runs in the middle of a step of its device's own Trio task.

Plain handlers run in the device's serving thread, outside Trio; the
runtime holds the device's lock around them and around every step of the
device's tasks.  The device below updates two registers in one step of
its ``run()`` task, with a stretch of pure computation in between longer
than Python's thread switch interval (so another thread would get the
interpreter there), and a handler checks that it always sees both updated
or neither.
"""

from __future__ import annotations

import struct
import sys
import time
from collections.abc import Awaitable, Callable

import pytest
import trio

from vdev import RO, Bar, Device, Register
from vdev.client import Client

pytestmark = pytest.mark.requires("libvfio-user")
Connect = Callable[[Device], Awaitable[Client]]


class Pair(Device):
    vendor_id = 0x1B36
    device_id = 0x0F44
    bar0 = Bar(
        4096,
        registers=[
            Register("first", 0x0, access=RO),
            Register("second", 0x4, access=RO),
            Register("consistent", 0x8, access=RO),
        ],
    )

    async def run(self) -> None:
        while True:
            self.bar0["first"] += 1
            busy_until = time.thread_time() + 2 * sys.getswitchinterval()
            while time.thread_time() < busy_until:
                pass
            self.bar0["second"] += 1
            await trio.lowlevel.checkpoint()

    @bar0.on_read("consistent")
    def check(self) -> int:
        return int(self.bar0["first"] == self.bar0["second"])


async def test_a_plain_handler_never_sees_half_a_step_of_the_devices_task(vdev_client: Connect) -> None:
    device = Pair()
    client = await vdev_client(device)
    await client.enable(memory=True, io=False, master=False)
    seen = [struct.unpack("<I", await client.region_read(0, 0x8, 4))[0] for _ in range(40)]
    assert seen == [1] * 40
    assert device.bar0["first"] > 1  # the task did run in between
