"""The tutorial (docs/tutorial.md) works as written: its device, served, read by QEMU."""

from __future__ import annotations

import sys
from pathlib import Path

import trio

from vdev.model.events import Irq
from vdev.qemu import enable_msi
from vdev.testing import AttachQemu

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from mytimer import MyTimer  # noqa: E402


async def test_qemu_reads_my_register_and_gets_the_timer_msi(vdev_qemu: AttachQemu) -> None:
    device = MyTimer()
    vm, timer = await vdev_qemu(device, enable={"memory", "master"})
    assert await timer.bar_readl(0, 0x00) == 0x7157_7157
    await timer.bar_writel(0, 0x04, 5)
    assert await timer.bar_readl(0, 0x04) == 5  # QEMU posts BAR writes; a read orders them
    assert device.bar0["period"] == 5
    mailbox = await enable_msi(timer, vm.guest_memory.alloc(4096))
    await timer.bar_writel(0, 0x0C, 1)
    with trio.fail_after(10):
        await mailbox.wait()
    assert await timer.bar_readl(0, 0x08) & 1
    await timer.bar_writel(0, 0x08, 1)
    await timer.bar_writel(0, 0x0C, 0)
    assert device.events.of_kind(Irq)
