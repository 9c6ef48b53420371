"""``vdev inspect``: the report of a served device has its IDs, capabilities, regions and IRQs right."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Awaitable, Callable

import pytest
import trio

from vdev import Device
from vdev.runtime import DeviceContext
from vdev_devices.membar import MemBar

pytestmark = pytest.mark.requires("libvfio-user")


async def inspect(socket: str, *args: str) -> str:
    result = await trio.run_process(
        [sys.executable, "-m", "vdev", "inspect", socket, *args], capture_stdout=True, capture_stderr=True
    )
    return result.stdout.decode()


async def test_inspect_describes_a_served_device(vdev_serve: Callable[[Device], Awaitable[DeviceContext]]) -> None:
    context = await vdev_serve(MemBar(size="1M", vectors=8))
    report = json.loads(await inspect(str(context.socket_path), "--json"))
    assert (report["vendor_id"], report["device_id"], report["class_code"]) == (0x1B36, 0x0F01, 0x058000)
    assert report["config_size"] == 4096 and report["resettable"]
    caps = {cap["name"]: cap for cap in report["capabilities"]}
    assert caps["MSI-X"]["details"] == {"vectors": 8, "enabled": False, "table": "BAR4+0x1800", "pba": "BAR4+0x1c00"}
    assert caps["PCI Express"]["details"]["flr"] is True
    regions = {region["name"]: region for region in report["regions"]}
    assert regions["BAR0"]["size"] == 1 << 20 and regions["BAR0"]["mappable"]
    assert regions["BAR0"]["sparse_areas"] == [[0, 1 << 20]] and regions["BAR0"]["fds"] == 1
    assert regions["BAR2"]["size"] == 4096 and not regions["BAR2"]["mappable"]
    assert report["irqs"] == {"INTx": 1, "MSI": 4, "MSI-X": 8, "ERR": 1, "REQ": 1}
    bar0 = next(bar for bar in report["bars"] if bar["index"] == 0)
    assert bar0["kind"] == "mem64" and bar0["prefetchable"]

    # Issue 15: BARs the device does not implement were reported as mem32.
    assert {bar["index"]: bar["kind"] for bar in report["bars"]} == {
        0: "mem64",
        2: "mem32",
        3: "unimplemented",
        4: "mem32",
        5: "unimplemented",
    }

    text = await inspect(str(context.socket_path))
    assert text.startswith("1b36:0f01")
    assert "MSI-X: vectors=8" in text and "BAR0       1M rwm mmap [0x0+1M] (1 fd)" in text
    # Issue 15: the BAR registers were listed among the regions.
    regions_section = text.split("  regions:\n")[1].split("\n  BAR registers:\n")[0]
    assert "register" not in regions_section and "BAR3" not in text
    assert "    BAR0   0x0000000c (mem64, prefetchable)" in text.split("  BAR registers:\n")[1]


async def test_inspect_reports_an_unreachable_socket_in_one_line() -> None:
    result = await trio.run_process(
        [sys.executable, "-m", "vdev", "inspect", "/nonexistent/vdev.sock"],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert result.returncode == 1
    assert len(result.stderr.decode().strip().splitlines()) == 1


async def test_inspect_gives_up_in_time_and_names_who_holds_the_device(
    vdev_serve: Callable[[Device], Awaitable[DeviceContext]],
) -> None:
    """Issue 15: with another client attached, ``vdev inspect`` waited for ever, saying nothing."""
    from vdev.client import Client

    context = await vdev_serve(MemBar(size="1M"))
    command = [sys.executable, "-m", "vdev", "inspect", str(context.socket_path), "--timeout", "0.5"]
    async with Client.connect(context.socket_path) as holder:
        assert await holder.region_read(7, 0, 2) == b"\x36\x1b"
        with trio.fail_after(30):
            result = await trio.run_process(command, capture_stdout=True, capture_stderr=True, check=False)
    lines = result.stderr.decode().strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1
    assert "did not answer within 0.5 s" in lines[0] and f"held by pid {os.getpid()} (" in lines[0]
    with trio.fail_after(30):
        assert (await inspect(str(context.socket_path), "--timeout", "5")).startswith("1b36:0f01")
