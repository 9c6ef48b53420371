"""A served device through QEMU's machine lifecycle: system_reset, hot-plug, hot-unplug and re-plug."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from vdev.model.events import CommandChange, ConfigWrite, Connect, Disconnect, Reset
from vdev.qemu import QemuMachine
from vdev.testing import AttachQemu, served, vfio_user_pci
from vdev_devices.hello import Hello

pytestmark = pytest.mark.requires("qemu", "libvfio-user")
HELLO = (0x1B36, 0x0F00)


async def test_system_reset_reaches_the_device_as_a_reset_sequence(vdev_qemu: AttachQemu) -> None:
    device = Hello()
    vm, function = await vdev_qemu(device, enable={"memory", "master"})
    await function.bar_writel(0, 0x04, 0x55)
    assert await function.bar_readl(0, 0x00) == 0x48454C4F
    assert device.bar0["reads"] == 1
    device.events.clear()
    await vm.qmp.system_reset()
    events = list(device.events)
    # QEMU's reset sequence: COMMAND cleared by a config write, then DEVICE_RESET, then BARs rewritten.
    command_off = next(i for i, e in enumerate(events) if isinstance(e, CommandChange) and not e.memory)
    reset = next(i for i, e in enumerate(events) if isinstance(e, Reset))
    bar_rewrite = next(i for i, e in enumerate(events) if isinstance(e, ConfigWrite) and e.offset == 0x10)
    assert command_off < reset < bar_rewrite
    assert events[command_off].source == "client"
    assert events[reset].reason == "device"
    assert not device.command.memory and not device.command.master
    assert device.bar0["reads"] == 0  # a device reset restores registers...
    assert device.bar0["scratch"] == 0x55  # ...except sticky ones


@pytest.mark.parametrize("machine", ["pc", "q35"])
async def test_hot_plug_unplug_and_replug(vdev_socket_dir: Path, machine: str) -> None:
    device = Hello()
    socket = vdev_socket_dir / "hello.sock"
    extra = {"bus": "rp0"} if machine == "q35" else {}
    base_devices = ["pcie-root-port,id=rp0,chassis=1"] if machine == "q35" else []
    async with served(device, socket), QemuMachine(machine=machine, devices=base_devices) as vm:
        for round_number in range(2):
            await vm.qmp.device_add(**vfio_user_pci(socket, id="hot-hello", **extra))
            assert "hot-hello" in await vm.qmp.qom_list("/machine/peripheral")
            assert len(device.events.of_kind(Connect)) == round_number + 1
            if machine == "pc":
                function = await (await vm.pci_bus()).find(*HELLO)
                await function.map_bars()
                await function.enable(memory=True, io=False, master=False)
                assert await function.bar_readl(0, 0x00) == 0x48454C4F
            with trio.fail_after(20):
                await vm.hot_unplug("hot-hello")
            assert "hot-hello" not in await vm.qmp.qom_list("/machine/peripheral")
            with trio.fail_after(10):
                await device.events.wait_for(Disconnect, count=round_number + 1)
    assert [e.kind for e in device.events if e.kind in ("connect", "disconnect")] == [
        "connect",
        "disconnect",
        "connect",
        "disconnect",
    ]
