"""MSI-X through real QEMU: the guest programs and masks vectors in QEMU's emulated table.

QEMU's ``vfio-user-pci`` never forwards table writes to the device; the
device hears only which eventfds QEMU installs.  These tests drive the table
the way a guest driver does and watch the messages land in guest RAM.
"""

from __future__ import annotations

import pytest
import trio

from vdev import RO, WO, Bar, Device, MsiX, Register
from vdev.qemu import MsixTable, PciFunction, QemuMachine, enable_msix
from vdev.testing import AttachQemu

pytestmark = pytest.mark.requires("qemu", "libvfio-user")


class Ringer(Device):
    """Two MSI-X vectors; writing ``n`` to the doorbell signals vector ``n``."""

    vendor_id = 0x1B36
    device_id = 0x5158
    bar0 = Bar(
        4096,
        registers=[Register("doorbell", 0x0, access=WO), Register("id", 0x4, access=RO, reset=0x5158)],
    )

    def capabilities(self) -> list[MsiX]:
        return [MsiX(vectors=2, table_bar=0, table_offset=0x800, pba_bar=0, pba_offset=0xC00)]

    @bar0.on_write("doorbell")
    def ring(self, value: int) -> None:
        self.irq.trigger(value)


async def ringer_in_qemu(vdev_qemu: AttachQemu) -> tuple[Ringer, QemuMachine, PciFunction]:
    device = Ringer()
    vm, function = await vdev_qemu(device, enable={"memory", "master"})
    return device, vm, function


async def ring(function: PciFunction, vector: int) -> None:
    """Ring the doorbell; the read after it returns once the device has handled the (posted) write."""
    await function.bar_writel(0, 0x0, vector)
    assert await function.bar_readl(0, 0x4) == 0x5158


async def delivered(table: MsixTable, vector: int) -> int:
    with trio.fail_after(10):
        return await table.mailboxes[vector].wait()


async def test_both_vectors_write_their_messages_to_guest_ram(vdev_qemu: AttachQemu) -> None:
    device, vm, function = await ringer_in_qemu(vdev_qemu)
    table = await enable_msix(function, vm.guest_memory.alloc(64))
    assert device.irq.mode == "msix"  # QEMU forwards the enable bit
    for vector in (0, 1, 1, 0):
        await ring(function, vector)
        assert await delivered(table, vector) == vector
    assert await table.pending() == set()


async def test_a_vector_the_guest_masks_waits_and_fires_on_unmask(vdev_qemu: AttachQemu) -> None:
    _device, vm, function = await ringer_in_qemu(vdev_qemu)
    table = await enable_msix(function, vm.guest_memory.alloc(64))
    await table.mask(0)
    await ring(function, 0)
    await ring(function, 1)
    # Vector 1 was signalled after vector 0: once its message has landed,
    # QEMU has seen vector 0's signal too, and kept it back.
    assert await delivered(table, 1) == 1
    assert await table.mailboxes[0].take() is None
    await table.unmask(0)
    assert await delivered(table, 0) == 0


async def test_a_vector_masked_when_msix_is_enabled_is_held_pending_by_the_device(vdev_qemu: AttachQemu) -> None:
    """QEMU installs no eventfd for a vector the guest masked: the device holds it, and the guest sees its PBA bit."""
    device, vm, function = await ringer_in_qemu(vdev_qemu)
    table = await enable_msix(function, vm.guest_memory.alloc(64), masked={1})
    await ring(function, 1)
    assert device.irq.msix_pending == {1}
    assert await table.pending() == {1}
    assert await table.mailboxes[1].take() is None
    await table.unmask(1)
    assert await delivered(table, 1) == 1
    assert await table.pending() == set()
    await ring(function, 0)
    assert await delivered(table, 0) == 0


async def test_the_function_mask_holds_every_vector_until_cleared(vdev_qemu: AttachQemu) -> None:
    device, vm, function = await ringer_in_qemu(vdev_qemu)
    table = await enable_msix(function, vm.guest_memory.alloc(64))
    await table.mask_function(True)
    await ring(function, 0)
    await ring(function, 1)
    assert await table.pending() == {0, 1}
    assert [await mailbox.take() for mailbox in table.mailboxes] == [None, None]
    await table.mask_function(False)
    assert [await delivered(table, vector) for vector in (0, 1)] == [0, 1]
    assert device.irq.msix_pending == set()
