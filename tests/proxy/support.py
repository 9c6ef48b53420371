"""Shared pieces of the proxy tests: a device behind a proxy, and checks that the server still serves."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import trio

from vdev import Device
from vdev.client import Client
from vdev.proxy import Proxy, WireFaultPlan, proxied
from vdev.testing import served
from vdev_devices.hello import Hello

CONFIG = 7
HELLO_IDS = (0x1B36, 0x0F00)
HELLO_ID_VALUE = 0x48454C4F
#: QEMU gives up on a reply after this many milliseconds in these tests.
MSG_TIMEOUT_MS = 500


class Impostor(Hello):
    """Hello with another id register value: what a regression in ``Hello`` would look like."""

    def read_id(self) -> int:
        self.bar0["reads"] += 1
        return 0x50494D49  # "IMIP"


@dataclass
class Behind:
    """A served device and the proxy in front of it."""

    device: Device
    server_path: Path
    proxy_path: Path
    proxy: Proxy


@asynccontextmanager
async def behind_proxy(
    directory: Path,
    device: Device | None = None,
    *,
    plan: WireFaultPlan | None = None,
    transcript: IO[str] | None = None,
    fault_log: IO[str] | None = None,
) -> AsyncIterator[Behind]:
    """Serve ``device`` (a ``Hello`` by default) and put a proxy in front of it."""
    device = device if device is not None else Hello()
    server_path = directory / "server.sock"
    proxy_path = directory / "proxy.sock"
    async with (
        served(device, server_path),
        proxied(proxy_path, server_path, plan=plan, transcript=transcript, fault_log=fault_log) as proxy,
    ):
        yield Behind(device, server_path, proxy_path, proxy)


async def enable_memory(client: Client) -> None:
    """Set MEM in the command register, as firmware would, so BAR accesses reach the device."""
    await client.region_write(CONFIG, 0x04, (0x0006).to_bytes(2, "little"))


async def hello_id(client: Client) -> int:
    return int.from_bytes(await client.region_read(0, 0x00, 4), "little")


async def assert_still_served(path: Path) -> None:
    """A new client gets through: the server (and the proxy) survived what came before."""
    with trio.fail_after(10):
        async with Client.connect(path) as client:
            await enable_memory(client)
            assert await hello_id(client) == HELLO_ID_VALUE
