"""Connect / negotiate / access / disconnect, many times, also abruptly: nothing leaks, state stays right.

The count is ``VDEV_SOAK_CYCLES`` (CI runs 200; ``make soak`` runs 1,000).
The server's open fds must come back to exactly where they were after a
warm-up, and its RSS may not grow by more than a small bound.
"""

from __future__ import annotations

import os
import resource
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio

from vdev import Device
from vdev.client import Client
from vdev.model.events import Connect, Disconnect
from vdev.runtime import DeviceContext
from vdev_devices.membar import MemBar

pytestmark = pytest.mark.requires("libvfio-user")
CYCLES = int(os.environ.get("VDEV_SOAK_CYCLES", "200"))
RSS_GROWTH_BOUND = 16 << 20
Serve = Callable[[Device], Awaitable[DeviceContext]]


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()


async def polite_cycle(path: Path, cycle: int) -> None:
    async with Client.connect(path) as client:
        await client.enable(memory=True, io=False, master=False)
        await client.region_write(2, 0x00, struct.pack("<Q", cycle))
        assert struct.unpack("<Q", await client.region_read(2, 0x00, 8))[0] == cycle
        bar0 = await client.map_region(0)
        bar0.write(0x1000, struct.pack("<Q", cycle))
        region = await client.dma_map_memfd(0x100000, 0x1000)
        await client.dma_unmap(region)


async def abrupt_cycle(path: Path, cycle: int) -> None:
    """Negotiate, then die in the middle of a message: a header promising a body that never comes."""
    async with Client.connect(path) as client:
        header = struct.pack("=HHIII", 0x100, 9, 16 + 16, 0, 0)
        await client.send_raw(header + struct.pack("=QII", 0, 7, 4)[: cycle % 16])


async def test_many_clients_leave_no_trace(vdev_serve: Serve) -> None:
    device = MemBar(size="1M")
    context = await vdev_serve(device)
    for warmup in range(20):
        await polite_cycle(context.socket_path, warmup)
        await abrupt_cycle(context.socket_path, warmup)
    device.events.clear()
    fds, rss = open_fds(), rss_bytes()
    for cycle in range(CYCLES):
        await (abrupt_cycle if cycle % 3 == 2 else polite_cycle)(context.socket_path, cycle)
        if cycle % 50 == 0:
            device.events.clear()  # the log is bounded by design; measure leaks, not retention
    with trio.fail_after(10):
        while device.events.of_kind(Connect) and len(device.events.of_kind(Disconnect)) < len(
            device.events.of_kind(Connect)
        ):
            await trio.sleep(0.01)
    assert open_fds() == fds
    assert rss_bytes() - rss < RSS_GROWTH_BOUND
    last_polite = max(c for c in range(CYCLES) if c % 3 != 2)
    assert device.bar2["epoch"] == last_polite
    assert device.bar(0).memory[0x1000:0x1008] == struct.pack("<Q", last_polite)
    assert not device.dma.mappings
