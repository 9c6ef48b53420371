"""A device served by vdev, seen through real QEMU in qtest mode."""

from __future__ import annotations

import logging
import os

import pytest
import trio

from vdev import RO, RW, RW1C, Bar, Device, Msi, Register
from vdev.model.events import Connect, Disconnect, HandlerError
from vdev.testing import AttachQemu
from vdev_devices.hello import Hello

PCI_STATUS, PCI_CAPABILITY_LIST = 0x06, 0x34


class Counter(Device):
    """The ~20-line device of the framework issue: identity, one BAR with two registers, one MSI vector."""

    vendor_id = 0x1B36
    device_id = 0x1234
    subsystem_vendor_id = 0x1AF4
    subsystem_id = 0x0042
    class_code = 0x058000
    bar0 = Bar(
        4096,
        registers=[
            Register("count", 0x0, width=8, access=RW),
            Register("status", 0x8, width=4, access=RW1C, reset=0xF),
            Register("magic", 0xC, width=4, access=RO, reset=0xC0FFEE),
        ],
    )

    def capabilities(self) -> list[Msi]:
        return [Msi(vectors=1)]


async def test_qemu_reads_ids_programs_bar_and_reaches_a_python_handler(vdev_qemu: AttachQemu) -> None:
    device = Hello()
    function = (await vdev_qemu(device, enable={"memory"})).function
    assert (function.vendor_id, function.device_id) == (0x1B36, 0x0F00)
    bars = await function.bars()
    assert bars[0].size == 4096
    assert await function.read_config(0x04, 2) & 0x7 == 0x2
    assert device.command.memory
    assert await function.bar_readl(0, 0x00) == 0x48454C4F
    assert device.bar0["reads"] == 1
    await function.bar_writel(0, 0x04, 0xA5A5_5A5A)
    # QEMU posts memory-BAR writes to a device without mapped areas; a read orders them.
    assert await function.bar_readl(0, 0x04) == 0xA5A5_5A5A
    assert device.bar0["scratch"] == 0xA5A5_5A5A
    kinds = [event.kind for event in device.events]
    assert kinds.index("command") < kinds.index("region_read")


async def test_config_space_seen_by_qemu(vdev_qemu: AttachQemu) -> None:
    device = Counter()
    function = (await vdev_qemu(device, enable=())).function
    assert await function.read_config(0x2C, 4) == 0x0042_1AF4
    assert await function.read_config(0x08, 4) >> 8 == 0x058000
    await function.write_config(0x00, 0xFFFF_FFFF)  # IDs are read-only
    assert await function.read_config(0x00, 4) == 0x1234_1B36
    assert await function.read_config(PCI_STATUS, 2) & 0x10
    pointer = await function.read_config(PCI_CAPABILITY_LIST, 1)
    assert pointer >= 0x40 and await function.read_config(pointer, 1) == 0x05
    assert await function.read_config(pointer + 1, 1) == 0
    assert await function.find_capability(0x05) == pointer
    assert (await function.bars())[0].size == 4096
    device.config.write_int(PCI_STATUS, 2, device.config.read_int(PCI_STATUS, 2) | 0x2000)
    await function.write_config(PCI_STATUS, 0x2000, 2)  # RW1C: clears "received master abort"
    assert device.config.read_int(PCI_STATUS, 2) & 0x2000 == 0


async def test_register_accesses_of_every_size_through_qemu(vdev_qemu: AttachQemu) -> None:
    device = Counter()
    function = (await vdev_qemu(device, enable={"memory"})).function
    await function.bar_writeq(0, 0x0, 0x0123_4567_89AB_CDEF)
    assert await function.bar_readq(0, 0x0) == 0x0123_4567_89AB_CDEF  # orders the posted write
    assert device.bar0["count"] == 0x0123_4567_89AB_CDEF
    assert await function.bar_readl(0, 0x4) == 0x0123_4567
    assert await function.bar_readw(0, 0x2) == 0x89AB
    assert await function.bar_readb(0, 0x1) == 0xCD
    await function.bar_writeb(0, 0x0, 0x11)
    assert await function.bar_readq(0, 0x0) == 0x0123_4567_89AB_CD11
    assert device.bar0["count"] == 0x0123_4567_89AB_CD11
    await function.bar_writel(0, 0x8, 0x3)  # RW1C
    assert await function.bar_readl(0, 0x8) == 0xC
    await function.bar_writel(0, 0xC, 0)  # RO
    assert await function.bar_readl(0, 0xC) == 0xC0FFEE


async def test_second_qemu_after_the_first_has_gone(vdev_qemu: AttachQemu) -> None:
    device = Hello()
    first = await vdev_qemu(device, enable={"memory"})
    await first.function.bar_writel(0, 0x04, 0x1234_5678)
    assert await first.function.bar_readl(0, 0x00) == 0x48454C4F
    assert device.bar0["reads"] == 1
    qemu_pid = first.vm.pid
    assert qemu_pid is not None
    await first.vm.quit()
    with pytest.raises(ProcessLookupError):
        os.kill(qemu_pid, 0)
    with trio.fail_after(10):
        await device.events.wait_for(Disconnect)
    second = (await vdev_qemu(device, enable={"memory"})).function
    assert await second.bar_readl(0, 0x04) == 0x1234_5678  # sticky: survives the reset
    assert await second.bar_readl(0, 0x08) == 0  # not sticky: reset when QEMU attached
    kinds = [event.kind for event in device.events if event.kind in ("connect", "disconnect")]
    assert kinds == ["connect", "disconnect", "connect"]


class Slow(Device):
    """A read that waits, in its handler, until the test lets it finish."""

    vendor_id = 0x1B36
    device_id = 0x5106
    bar0 = Bar(4096, registers=[Register("slow", 0x0)])

    def __init__(self) -> None:
        super().__init__()
        self.entered = trio.Event()
        self.release = trio.Event()

    @bar0.on_read("slow")
    async def read_slow(self) -> int:
        self.entered.set()
        await self.release.wait()
        return 0x5106


async def test_an_awaiting_handler_does_not_stall_another_device(vdev_qemu: AttachQemu) -> None:
    """Another device answers QEMU while this one's handler awaits; were they served in turn, the deadline fails it."""
    slow = Slow()
    slow_function = (await vdev_qemu(slow, enable={"memory"})).function
    fast_function = (await vdev_qemu(Hello(), enable={"memory"})).function
    order: list[str] = []

    async def slow_read() -> None:
        assert await slow_function.bar_readl(0, 0) == 0x5106
        order.append("slow done")

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(slow_read)
            await slow.entered.wait()
            for value in range(20):
                await fast_function.bar_writel(0, 0x04, value)
                assert await fast_function.bar_readl(0, 0x04) == value
            order.append("fast done")
            slow.release.set()
    assert order == ["fast done", "slow done"]


class Faulty(Device):
    vendor_id = 0x1B36
    device_id = 0xBAD0
    bar0 = Bar(4096, registers=[Register("broken", 0x0), Register("fine", 0x4, reset=0x600D)])

    @bar0.on_read("broken")
    def read_broken(self) -> int:
        raise RuntimeError("deliberate failure")


async def test_a_raising_handler_fails_only_that_access(
    vdev_qemu: AttachQemu, caplog: pytest.LogCaptureFixture
) -> None:
    device = Faulty()
    function = (await vdev_qemu(device, enable={"memory"})).function
    with caplog.at_level(logging.ERROR, logger="vdev"):
        assert await function.bar_readl(0, 0x0) == 0xFFFF_FFFF
    assert await function.bar_readl(0, 0x4) == 0x600D
    failure = [r.getMessage() for r in caplog.records if "deliberate failure" in r.getMessage()]
    assert failure and "faulty" in failure[0] and "BAR0+0x0 (broken)" in failure[0]
    assert [e.region for e in device.events.of_kind(HandlerError)] == [0]


async def test_state_survives_twenty_clients_in_turn(vdev_qemu: AttachQemu) -> None:
    device = Hello()
    for round_number in range(20):
        attached = await vdev_qemu(device, enable={"memory"})
        assert await attached.function.bar_readl(0, 0x04) == round_number
        await attached.function.bar_writel(0, 0x04, round_number + 1)
        assert await attached.function.bar_readl(0, 0x04) == round_number + 1  # orders the posted write
        await attached.vm.quit()
        with trio.fail_after(10):
            await device.events.wait_for(Disconnect, count=round_number + 1)
    assert device.bar0["scratch"] == 20
    assert len(device.events.of_kind(Connect)) == 20
