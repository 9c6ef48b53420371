"""vdev's ``edu`` against QEMU's own ``-device edu``: the same qtest sequences, identical answers.

Each scenario is one async function that drives a PCI function through the
qtest harness and returns what it observed.  It runs twice — against QEMU's
built-in edu and against vdev's edu served over vfio-user, each in its own
QEMU — and the two transcripts must be equal.  Polling loops step QEMU's
virtual clock (edu's DMA timer runs on it) and give vdev's Trio engines a
moment of real time, so both converge to the same final observations.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio

from vdev.model.events import DmaMap
from vdev.qemu import PciFunction, QemuMachine, enable_msi, q35_intx_gsi
from vdev.testing import AttachQemu
from vdev_devices.edu import Edu

pytestmark = pytest.mark.requires("qemu", "libvfio-user")

Observed = list[Any]
Scenario = Callable[[QemuMachine, PciFunction], Awaitable[Observed]]
SLOT = 3


async def run_against_qemus_edu(scenario: Scenario) -> Observed:
    async with QemuMachine(devices=[f"edu,addr={SLOT:#x}"]) as vm:
        function = await (await vm.pci_bus()).find(0x1234, 0x11E8)
        await function.map_bars()
        await function.enable(memory=True, io=False, master=True)
        return await scenario(vm, function)


async def run_against_vdevs_edu(scenario: Scenario, vdev_qemu: AttachQemu) -> Observed:
    device = Edu(dma_delay=0.01)
    vm, function = await vdev_qemu(device, enable={"memory", "master"}, properties={"addr": f"{SLOT:#x}"})
    return await scenario(vm, function)


async def settle(vm: QemuMachine, done: Callable[[], Awaitable[bool]]) -> int:
    """Poll until ``done``; returns how many polls it took at most 50 (the result is not compared)."""
    for polls in range(50):
        if await done():
            return polls
        await vm.qtest.clock_step(200_000_000)
        await trio.sleep(0.02)
    raise AssertionError("edu did not finish")


async def identity_and_config(vm: QemuMachine, edu: PciFunction) -> Observed:
    msi = await edu.find_capability(0x05)
    assert msi is not None
    return [
        await edu.read_config(0x00, 4),
        await edu.read_config(0x08, 4),
        await edu.read_config(0x2C, 4),
        await edu.read_config(0x3D, 1),
        await edu.read_config(0x06, 2) & 0x10,
        msi,
        await edu.read_config(msi + 2, 2),
        (await edu.bars())[0].size,
        await edu.bar_readl(0, 0x00),
    ]


async def liveness_and_access_sizes(vm: QemuMachine, edu: PciFunction) -> Observed:
    observed: Observed = []
    for value in (0x12345678, 0, 0xFFFFFFFF):
        await edu.bar_writel(0, 0x04, value)
        observed.append(await edu.bar_readl(0, 0x04))
    observed += [
        await edu.bar_readw(0, 0x00),
        await edu.bar_readb(0, 0x04),
        await edu.bar_readq(0, 0x00),
        await edu.bar_readl(0, 0x10),
        await edu.bar_readl(0, 0x40000),
    ]
    await edu.bar_writew(0, 0x04, 0)  # wrong size: ignored
    observed.append(await edu.bar_readl(0, 0x04))
    await edu.bar_writeq(0, 0x80, 0x1_2345_6789)
    observed.append(await edu.bar_readq(0, 0x80))
    await edu.bar_writel(0, 0x80, 0xABCD)  # a 4-byte write replaces the whole register
    observed.append(await edu.bar_readq(0, 0x80))
    await edu.bar_writel(0, 0x84, 5)  # not a register offset: ignored
    observed += [await edu.bar_readq(0, 0x80), await edu.bar_readl(0, 0x84)]
    return observed


async def intx_level(vm: QemuMachine, gsi: int) -> bool:
    """The INTx level once QEMU has caught up: over vfio-user a BAR access lowers it until the device re-signals."""
    await vm.qtest.settle()
    return vm.qtest.get_irq(gsi)


async def factorial_with_intx(vm: QemuMachine, edu: PciFunction) -> Observed:
    gsi = q35_intx_gsi(edu.address, 1)
    await vm.qtest.irq_intercept_in("ioapic")
    observed: Observed = [await intx_level(vm, gsi)]
    await edu.bar_writel(0, 0x20, 0x80)
    await edu.bar_writel(0, 0x08, 10)
    await settle(vm, lambda: _status_idle(edu))
    observed += [await edu.bar_readl(0, 0x08), await edu.bar_readl(0, 0x20), await edu.bar_readl(0, 0x24)]
    assert observed[1:4] == [3628800, 0x80, 0x1]
    with trio.fail_after(10):
        await vm.qtest.wait_irq(gsi, raised=True)
    observed.append(vm.qtest.get_irq(gsi))
    await edu.bar_writel(0, 0x64, 0x1)
    with trio.fail_after(10):
        await vm.qtest.wait_irq(gsi, raised=False)
    observed += [vm.qtest.get_irq(gsi), await edu.bar_readl(0, 0x24)]
    await edu.bar_writel(0, 0x20, 0)
    await edu.bar_writel(0, 0x08, 13)  # 13! overflows 32 bits
    await settle(vm, lambda: _status_idle(edu))
    observed += [await edu.bar_readl(0, 0x08), await edu.bar_readl(0, 0x24), await intx_level(vm, gsi)]
    await edu.bar_writel(0, 0x60, 0x40)
    with trio.fail_after(10):
        await vm.qtest.wait_irq(gsi, raised=True)
    observed += [await edu.bar_readl(0, 0x24), await intx_level(vm, gsi)]
    await edu.bar_writel(0, 0x64, 0x40)
    with trio.fail_after(10):
        await vm.qtest.wait_irq(gsi, raised=False)
    observed.append(vm.qtest.get_irq(gsi))
    return observed


async def _status_idle(edu: PciFunction) -> bool:
    return not await edu.bar_readl(0, 0x20) & 0x1


async def _dma_idle(edu: PciFunction) -> bool:
    return not await edu.bar_readl(0, 0x98) & 0x1


async def dma_round_trip(vm: QemuMachine, edu: PciFunction) -> Observed:
    source, destination = vm.guest_memory.alloc(4096), vm.guest_memory.alloc(4096)
    pattern = bytes((i * 7 + 3) & 0xFF for i in range(100))
    await vm.qtest.memwrite(source, pattern)
    await edu.bar_writeq(0, 0x80, source)
    await edu.bar_writeq(0, 0x88, 0x40000)
    await edu.bar_writeq(0, 0x90, len(pattern))
    await edu.bar_writeq(0, 0x98, 0x1)
    observed: Observed = [await edu.bar_readq(0, 0x98) & 0x1]
    await edu.bar_writeq(0, 0x80, 0xDEAD)  # frozen while the transfer runs
    await settle(vm, lambda: _dma_idle(edu))
    observed += [await edu.bar_readq(0, 0x80), await edu.bar_readq(0, 0x98)]
    await edu.bar_writeq(0, 0x80, 0x40000)
    await edu.bar_writeq(0, 0x88, destination + 8)
    await edu.bar_writeq(0, 0x98, 0x1 | 0x2 | 0x4)
    await settle(vm, lambda: _dma_idle(edu))
    observed += [
        await vm.qtest.memread(destination, 116),
        await edu.bar_readq(0, 0x98),
        await edu.bar_readl(0, 0x24),
    ]
    assert observed[3][8:108] == pattern and observed[5] == 0x100  # the scenario itself works
    return observed


async def msi_delivery(vm: QemuMachine, edu: PciFunction) -> Observed:
    mailbox = await enable_msi(edu, vm.guest_memory.alloc(64), data=0x4400)
    await edu.bar_writel(0, 0x60, 0x2)
    with trio.fail_after(10):
        first = await mailbox.wait()
    await edu.bar_writel(0, 0x20, 0x80)
    await edu.bar_writel(0, 0x08, 4)
    with trio.fail_after(10):
        second = await mailbox.wait()
    await settle(vm, lambda: _status_idle(edu))
    observed = [first, second, await edu.bar_readl(0, 0x24), await edu.bar_readl(0, 0x08)]
    assert observed == [0, 0, 0x3, 24]  # vector 0 twice
    return observed


SCENARIOS = [identity_and_config, liveness_and_access_sizes, factorial_with_intx, dma_round_trip, msi_delivery]


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.__name__ for s in SCENARIOS])
async def test_vdev_edu_answers_like_qemus_edu(scenario: Scenario, vdev_qemu: AttachQemu) -> None:
    reference = await run_against_qemus_edu(scenario)
    ours = await run_against_vdevs_edu(scenario, vdev_qemu)
    assert ours == reference


async def test_message_dma_through_qemu_without_shared_memory(vdev_qemu: AttachQemu) -> None:
    """Without shareable guest RAM QEMU maps DMA without fds: every transfer is a DMA_READ/DMA_WRITE message.

    DESIGN.md suspected QEMU's DMA message layout (a u32 count) would shift
    the data by 4 bytes; with QEMU 11.1 the bytes arrive where they belong.
    The test waits for edu's completion interrupt instead of polling: this
    libvfio-user reads the client's DMA reply from the request socket, so a
    request QEMU sends while a background transfer waits for its reply
    would be taken for that reply (see docs/limitations.md).
    """
    device = Edu(dma_delay=0)
    vm, edu = await vdev_qemu(device, enable={"memory", "master"}, shared_memory=False)
    assert not any(event.mapped for event in device.events.of_kind(DmaMap))
    gsi = q35_intx_gsi(edu.address, 1)
    await vm.qtest.irq_intercept_in("ioapic")
    source, destination = vm.guest_memory.alloc(4096), vm.guest_memory.alloc(4096)
    pattern = bytes((i * 7 + 3) & 0xFF for i in range(100))
    await vm.qtest.memwrite(source, pattern)
    for src, dst, command in ((source, 0x40000, 0x5), (0x40000, destination + 8, 0x7)):
        for offset, value in ((0x80, src), (0x88, dst), (0x90, len(pattern)), (0x98, command)):
            await edu.bar_writeq(0, offset, value)
        with trio.fail_after(10):
            await vm.qtest.wait_irq(gsi, raised=True)
        await edu.bar_writel(0, 0x64, 0x100)
        with trio.fail_after(10):
            await vm.qtest.wait_irq(gsi, raised=False)
    assert await vm.qtest.memread(destination, 116) == bytes(8) + pattern + bytes(8)
