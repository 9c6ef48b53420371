"""membar driven by a direct vfio-user client: the memory-enable policies as a client that maps BARs sees them."""

from __future__ import annotations

import signal
import sys

import pytest
import trio

from vdev.client import Client, VfioUserError
from vdev.model.events import CommandChange, Disconnect, MemoryAction, Violation
from vdev.testing import ConnectClient, ServeDevice, first_touch_ns, resident_pages
from vdev_devices.membar import MemBar

pytestmark = pytest.mark.requires("libvfio-user")

COMMAND, MEM, MASTER = 0x04, 0x2, 0x4


async def test_master_abort_reads_all_ones_and_counts_violations(vdev_client: ConnectClient) -> None:
    device = MemBar(size="1M")
    client = await vdev_client(device)
    await client.region_write(2, 0x00, (5).to_bytes(8, "little"))  # dropped: MEM is off
    assert await client.region_read(2, 0x00, 8) == b"\xff" * 8
    assert await client.region_read(4, 0x1000, 4) == b"\xff" * 4
    await client.enable(memory=True, io=False, master=False)
    assert await client.region_read(2, 0x00, 8) == bytes(8)
    assert await client.read64(2, 0x20) == 3
    violations = device.events.of_kind(Violation)
    assert [(v.region, v.offset, v.size, v.access) for v in violations] == [
        (2, 0x00, 8, "write"),
        (2, 0x00, 8, "read"),
        (4, 0x1000, 4, "read"),
    ]


async def test_error_policy_answers_with_an_error(vdev_client: ConnectClient) -> None:
    client = await vdev_client(MemBar(size="1M", disabled_access="error"))
    with pytest.raises(VfioUserError):
        await client.region_read(2, 0x00, 4)
    await client.enable(memory=True, io=False, master=False)
    assert await client.region_read(2, 0x00, 4) == bytes(4)


async def test_pass_policy_reaches_the_handler(vdev_client: ConnectClient) -> None:
    device = MemBar(size="1M", disabled_access="pass")
    client = await vdev_client(device)
    await client.region_write(2, 0x00, (9).to_bytes(8, "little"))
    assert device.bar2["epoch"] == 9 and not device.events.of_kind(Violation)


# A client in its own process: maps BAR0, writes, clears MEM, then touches its mapping.
TOUCH_AFTER_DISABLE = """
import sys, trio
from vdev.client import Client

async def main(path):
    async with Client.connect(path) as client:
        await client.enable(memory=True, io=False, master=False)
        bar0 = await client.map_region(0)
        bar0.write(0x1000, b"kept")
        await client.enable(memory=False, io=False, master=False)
        print("touching", flush=True)
        bar0.read(0x1000, 4)
        print("survived", flush=True)

trio.run(main, sys.argv[1])
"""


async def test_revoke_kills_a_client_touching_its_mapping_and_keeps_the_contents(vdev_serve: ServeDevice) -> None:
    device = MemBar(size="1M", mapping="revoke")
    context = await vdev_serve(device)
    result = await trio.run_process(
        [sys.executable, "-c", TOUCH_AFTER_DISABLE, str(context.socket_path)], capture_stdout=True, check=False
    )
    assert result.returncode == -signal.SIGBUS
    assert result.stdout.decode().split() == ["touching"]
    with trio.fail_after(10):
        await device.events.wait_for(Disconnect)
    async with Client.connect(context.socket_path) as client:
        await client.enable(memory=True, io=False, master=False)
        bar0 = await client.map_region(0)
        assert bar0.read(0x1000, 4) == b"kept"


@pytest.mark.parametrize("prefault", ["populate", "lazy"])
async def test_prefault_policy_decides_residency_when_enable_returns(vdev_client: ConnectClient, prefault: str) -> None:
    device = MemBar(size="4M", mapping="revoke", prefault=prefault)
    client = await vdev_client(device)
    await client.enable(memory=True, io=False, master=False)
    bar0 = await client.map_region(0)
    bar0.write(0x3000, b"data")
    await client.enable(memory=False, io=False, master=False)
    await client.enable(memory=True, io=False, master=False)  # answered only after the policy ran
    ((_, mapping),) = bar0.areas
    resident = resident_pages(mapping)
    pages = (4 << 20) // 4096
    if prefault == "populate":
        assert resident == pages
    else:
        assert resident == 1  # only the page that held data came back
    assert len(first_touch_ns(mapping)) == pages
    assert bar0.read(0x3000, 4) == b"data"


async def test_forced_and_held_memory_enable(vdev_client: ConnectClient) -> None:
    device = MemBar(size="1M")
    client = await vdev_client(device)
    device.command_control.force(memory=True)
    assert await client.config_read(COMMAND, 2) & MEM
    device.command_control.hold(memory=False)
    await client.enable(memory=True, io=False, master=True)
    command = await client.config_read(COMMAND, 2)
    assert command & MASTER and not command & MEM  # MASTER took, MEM is held off
    device.command_control.release()
    await client.enable(memory=True, io=False, master=False)
    assert device.command.memory
    sources = [e.source for e in device.events.of_kind(CommandChange)]
    assert sources == ["device", "device", "client", "client"]


async def test_toggle_schedules(vdev_client: ConnectClient) -> None:
    device = MemBar(size="1M", disabled_access="pass")
    client = await vdev_client(device)
    device.command_control.toggle_after_accesses(3)
    for _ in range(6):
        await client.region_read(2, 0x00, 8)
    assert [e.memory for e in device.events.of_kind(CommandChange)] == [True, False]
    with trio.fail_after(10):
        await device.command_control.toggle_every(0.01, count=4)
        await device.command_control.toggle_randomly(0.01, seed=7, count=3)
    transitions = [e.memory for e in device.events.of_kind(CommandChange)]
    assert transitions == [True, False, True, False, True, False, True, False, True]


def test_parameters_are_checked() -> None:
    with pytest.raises(ValueError):
        MemBar(mapping="sometimes")
    assert MemBar(size="64K").bar(0).size == 64 << 10


async def test_a_policy_set_at_run_time_as_its_string_keeps_the_contents(vdev_client: ConnectClient) -> None:
    """Issue 15: ``"revoke"`` was stored as a bare string, so clearing MEM discarded BAR0 and failed with EIO."""
    device = MemBar(size="1M")
    client = await vdev_client(device)
    await client.enable(memory=True, io=False, master=False)
    await client.region_write(0, 0x1000, b"kept")
    device.bar(0).mapping_when_disabled = "revoke"
    await client.enable(memory=False, io=False, master=False)
    await client.enable(memory=True, io=False, master=False)
    assert await client.region_read(0, 0x1000, 4) == b"kept"
    assert [e.action for e in device.events.of_kind(MemoryAction) if e.bar == 0] == ["revoke", "restore"]
