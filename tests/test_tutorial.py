"""The tutorial (docs/tutorial.md) works as written: its device, served, read by QEMU, firing its MSI."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import trio

from tests.documented import DOCS, assert_pytest_passes, python_blocks
from vdev.model.events import Irq
from vdev.qemu import enable_msi
from vdev.testing import AttachQemu

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
from mytimer import MyTimer  # noqa: E402


@pytest.mark.requires("qemu", "libvfio-user")
async def test_the_tutorials_own_test_passes_against_the_finished_device(tmp_path: Path) -> None:
    """Step 4's block, run the way the page says: pytest in trio mode, next to mytimer.py."""
    (tmp_path / "test_mytimer.py").write_text(python_blocks(DOCS / "tutorial.md")["test_mytimer.py"])
    shutil.copy(ROOT / "examples" / "mytimer.py", tmp_path / "mytimer.py")
    await assert_pytest_passes(tmp_path, "test_mytimer.py", 1, "-o", "trio_mode=true")


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
