"""membar and memory-enable through real QEMU: what QEMU does when MEM is cleared and set."""

from __future__ import annotations

from pathlib import Path

import pytest

from vdev.libvfio_user import Library
from vdev.model.events import CommandChange, RegionRead, RegionWrite
from vdev.qemu import QemuMachine, QemuStartError
from vdev.testing import AttachQemu, served, vfio_user_pci
from vdev_devices.membar import MemBar

pytestmark = pytest.mark.requires("qemu", "libvfio-user")


@pytest.mark.parametrize("mapping", ["keep", "revoke"])
async def test_clearing_mem_hides_the_bars_from_the_server_and_keeps_bar0(vdev_qemu: AttachQemu, mapping: str) -> None:
    device = MemBar(size="1M", mapping=mapping)
    function = (await vdev_qemu(device, enable={"memory", "master"})).function
    assert (await function.bars())[0].size == 1 << 20
    await function.bar_writeq(0, 0x1000, 0x1122_3344_5566_7788)  # straight into the mapping
    await function.bar_writeq(0, 0xF_FFF8, 0xAAAA_BBBB_CCCC_DDDD)
    assert device.bar(0).memory[0x1000:0x1008] == (0x1122_3344_5566_7788).to_bytes(8, "little")
    await function.bar_writel(2, 0x00, 7)  # epoch, trapped

    device.events.clear()
    await function.enable(memory=False, io=False, master=True)
    assert await function.bar_readl(2, 0x00) != 7  # BAR2 left the address space
    await function.bar_writel(2, 0x00, 8)
    assert await function.bar_readq(0, 0x1000) != 0x1122_3344_5566_7788  # so did BAR0
    kinds = [event.kind for event in device.events]
    assert kinds[:2] == ["config_write", "command"]
    assert not [k for k in kinds if k in ("region_read", "region_write", "violation")]
    if mapping == "revoke":
        assert device.bar(0).mapped is not None and device.bar(0).mapped.revoked

    await function.enable(memory=True, io=False, master=True)
    assert await function.bar_readq(0, 0x1000) == 0x1122_3344_5566_7788
    assert await function.bar_readq(0, 0xF_FFF8) == 0xAAAA_BBBB_CCCC_DDDD
    assert await function.bar_readq(2, 0x00) == 7
    commands = device.events.of_kind(CommandChange)
    assert [c.memory for c in commands] == [False, True]
    assert all(c.source == "client" for c in commands)


async def test_device_clears_its_own_mem_and_qemu_reads_the_forced_value(vdev_qemu: AttachQemu) -> None:
    device = MemBar(size="1M")
    function = (await vdev_qemu(device, enable={"memory", "master"})).function
    await function.bar_writel(2, 0x18, 1)  # self_disable
    assert not device.command.memory
    commands = device.events.of_kind(CommandChange)
    assert commands[-1].source == "device" and not commands[-1].memory


async def test_populate_makes_every_page_resident_before_the_enable_is_answered(vdev_qemu: AttachQemu) -> None:
    device = MemBar(size="4M", mapping="revoke", prefault="populate")
    function = (await vdev_qemu(device, enable={"memory", "master"})).function
    mapped = device.bar(0).mapped
    assert mapped is not None
    assert mapped.resident_pages() == (4 << 20) // 4096
    await function.enable(memory=False, io=False, master=True)
    assert mapped.revoked
    await function.enable(memory=True, io=False, master=True)
    assert mapped.resident_pages() == (4 << 20) // 4096


async def test_lazy_leaves_untouched_pages_out(vdev_qemu: AttachQemu) -> None:
    device = MemBar(size="4M", mapping="revoke", prefault="lazy")
    function = (await vdev_qemu(device, enable={"memory", "master"})).function
    await function.bar_writel(0, 0x3000, 0x5A5A5A5A)
    await function.enable(memory=False, io=False, master=True)
    await function.enable(memory=True, io=False, master=True)
    mapped = device.bar(0).mapped
    assert mapped is not None and mapped.resident_pages() == 1
    assert await function.bar_readl(0, 0x3000) == 0x5A5A5A5A


async def test_bar4_maps_two_areas_around_a_trapped_page(vdev_qemu: AttachQemu) -> None:
    """One fd for BAR4 and two areas in it (libvfio-user patch 0001): QEMU maps both and traps the page between."""
    device = MemBar(size="1M")
    function = (await vdev_qemu(device, enable={"memory"})).function
    memory = device.bar(4).memory
    memory[0x0:0x4] = (0x1122_3344).to_bytes(4, "little")  # what the device put in each area
    memory[0x2FFC:0x3000] = (0x5566_7788).to_bytes(4, "little")
    device.events.clear()
    assert await function.bar_readl(4, 0x0) == 0x1122_3344
    assert await function.bar_readl(4, 0x2FFC) == 0x5566_7788
    await function.bar_writel(4, 0x2000, 0xCAFE_F00D)
    assert memory[0x2000:0x2004] == (0xCAFE_F00D).to_bytes(4, "little")
    # Nothing of that reached the server as an access: QEMU went through its mappings.
    assert not [e for e in device.events if e.kind in ("region_read", "region_write")]
    await function.bar_writel(4, 0x1000, 0xA5A5_5A5A)  # scratch, in the trapped page
    assert await function.bar_readl(4, 0x1000) == 0xA5A5_5A5A
    accesses = device.events.of_kind(RegionRead, RegionWrite)
    assert [(e.kind, e.region, e.offset) for e in accesses] == [
        ("region_write", 4, 0x1000),
        ("region_read", 4, 0x1000),
    ]


async def test_without_patch_0001_qemu_refuses_two_mapped_areas(
    vdev_socket_dir: Path, unpatched_libvfio_user: Library, caplog: pytest.LogCaptureFixture
) -> None:
    """The revision as it comes sends BAR4's fd once per area, and QEMU 11.1 fails realize on it."""
    socket = vdev_socket_dir / "membar.sock"
    async with served(MemBar(size="1M"), socket, library=unpatched_libvfio_user):
        with pytest.raises(QemuStartError, match="unexpected FDs"):
            async with QemuMachine(devices=[vfio_user_pci(socket)]):
                pass
    assert "0001-Send-one-fd-per-region-in-GET_REGION_INFO.patch" in caplog.text
