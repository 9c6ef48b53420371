"""The QEMU harness against a real QEMU, using QEMU's own ``edu``, ``pci-testdev`` and
``ivshmem-plain`` devices as known-good peers.

Each test starts its own small machine (well under a second), so a failure
points at one behaviour.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import trio

from vdev.qemu import (
    BarInfo,
    BarSpace,
    HotplugError,
    PciBus,
    PciFunction,
    QemuExitedError,
    QemuMachine,
    QemuStartError,
    QTestError,
    enable_msi,
    enable_q35_ecam,
    q35_intx_gsi,
)

EDU = (0x1234, 0x11E8)
PCI_TESTDEV = (0x1B36, 0x0005)
IVSHMEM = (0x1AF4, 0x1110)

# edu's MMIO registers (QEMU docs/specs/edu.rst).
EDU_ID = 0x00
EDU_LIVENESS = 0x04
EDU_FACTORIAL = 0x08
EDU_STATUS = 0x20
EDU_IRQ_STATUS = 0x24
EDU_IRQ_RAISE = 0x60
EDU_IRQ_ACK = 0x64
EDU_STATUS_IRQ_ON_FACTORIAL = 0x80
EDU_STATUS_COMPUTING = 0x01
EDU_DMA_SOURCE = 0x80
EDU_DMA_DESTINATION = 0x88
EDU_DMA_COUNT = 0x90
EDU_DMA_COMMAND = 0x98
EDU_DMA_START = 0x1
EDU_DMA_TO_RAM = 0x2
EDU_DMA_BUFFER = 0x40000

#: Generous bound for QEMU-side work (edu computes factorials in a thread).
DEADLINE = 10


def machine(qemu_binary: Path, **options: object) -> QemuMachine:
    return QemuMachine(binary=qemu_binary, **options)  # type: ignore[arg-type]


async def live_edu(vm: QemuMachine) -> PciFunction:
    bus = await vm.pci_bus()
    edu = await bus.find(*EDU)
    await edu.map_bars()
    await edu.enable()
    return edu


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# -- enumeration and BARs ----------------------------------------------------------


async def test_enumerate_finds_edu_and_multifunction_chipset(qemu_binary: Path) -> None:
    async with machine(qemu_binary, devices=["edu"]) as vm:
        functions = await (await vm.pci_bus()).enumerate()
    found = {(f.vendor_id, f.device_id): f for f in functions}
    assert EDU in found
    assert found[EDU].class_code == 0x00FF00
    # q35's LPC, SATA and SMBus are functions 0, 2 and 3 of slot 0x1f.
    assert {str(f.address) for f in functions} >= {"00:1f.0", "00:1f.2", "00:1f.3"}


async def test_edu_bar0_sizes_to_1mib_of_32bit_memory(qemu_binary: Path) -> None:
    async with machine(qemu_binary, devices=["edu"]) as vm:
        edu = await (await vm.pci_bus()).find(*EDU)
        assert await edu.size_bar(0) == BarInfo(0, BarSpace.MEMORY, 1 << 20)
        assert await edu.size_bar(1) is None


async def test_edu_registers_answer_once_mapped_and_enabled(qemu_binary: Path) -> None:
    async with machine(qemu_binary, devices=["edu"]) as vm:
        edu = await live_edu(vm)
        # Placed in the 32-bit PCI hole, above q35's ECAM window.
        assert 0xC000_0000 <= edu.bar_address(0) < 0xFEC0_0000
        assert await edu.bar_readl(0, EDU_ID) == 0x010000ED
        await edu.bar_writel(0, EDU_LIVENESS, 0x1234_5678)
        assert await edu.bar_readl(0, EDU_LIVENESS) == 0xEDCB_A987


async def test_64bit_bar_is_placed_above_4gib_and_works(qemu_binary: Path) -> None:
    options = {
        "devices": ["ivshmem-plain,memdev=shm"],
        "extra_args": ["-object", "memory-backend-memfd,id=shm,size=1M,share=on"],
    }
    async with machine(qemu_binary, **options) as vm:
        ivshmem = await (await vm.pci_bus()).find(*IVSHMEM)
        bar = await ivshmem.size_bar(2)
        assert bar == BarInfo(2, BarSpace.MEMORY, 1 << 20, is_64bit=True, prefetchable=True)
        with pytest.raises(ValueError, match="upper half"):
            await ivshmem.size_bar(3)
        addresses = await ivshmem.map_bars()
        await ivshmem.enable()
        assert addresses[2] >= 1 << 32
        await ivshmem.bar_writeq(2, 0x100, 0x1122_3344_5566_7788)
        assert await ivshmem.bar_readq(2, 0x100) == 0x1122_3344_5566_7788
        assert await ivshmem.bar_readl(2, 0x104) == 0x1122_3344
        assert await ivshmem.bar_readw(2, 0x102) == 0x5566
        assert await ivshmem.bar_readb(2, 0x101) == 0x77


async def test_io_bar_accesses_use_port_io(qemu_binary: Path) -> None:
    async with machine(qemu_binary, devices=["pci-testdev"]) as vm:
        testdev = await (await vm.pci_bus()).find(*PCI_TESTDEV)
        assert await testdev.size_bar(1) == BarInfo(1, BarSpace.IO, 256)
        addresses = await testdev.map_bars()
        await testdev.enable()
        assert 0xC000 <= addresses[1] < 0x1_0000
        # Selecting test 0 through the I/O BAR exposes its name at offset 16.
        await testdev.bar_writeb(1, 0, 0)
        assert await testdev.bar_readb(1, 16) == ord("p")
        assert await testdev.bar_readw(1, 16) == int.from_bytes(b"po", "little")
        assert await testdev.bar_readl(1, 16) == int.from_bytes(b"port", "little")
        with pytest.raises(ValueError, match="port I/O size"):
            await testdev.bar_readq(1, 16)


async def test_ecam_sees_the_same_functions_as_ports(qemu_binary: Path) -> None:
    async with machine(qemu_binary, devices=["edu"]) as vm:
        by_ports = await (await vm.pci_bus()).enumerate()
        ecam = PciBus(vm.qtest, config=await enable_q35_ecam(vm.qtest))
        by_ecam = await ecam.enumerate()
        assert [(f.address, f.vendor_id, f.device_id) for f in by_ecam] == [
            (f.address, f.vendor_id, f.device_id) for f in by_ports
        ]
        edu = await ecam.find(*EDU)
        # Extended configuration space is reachable only through ECAM.
        assert await edu.read_config(0x100) == 0xFFFF_FFFF
        with pytest.raises(ValueError):
            await (await vm.pci_bus()).config.read(edu.address, 0x100, 4)


# -- interrupts -----------------------------------------------------------------------


@pytest.mark.parametrize("slot", [1, 4])
async def test_factorial_raises_intx_on_the_expected_gsi(qemu_binary: Path, slot: int) -> None:
    async with machine(qemu_binary, devices=[f"edu,addr={slot:#x}"]) as vm:
        edu = await live_edu(vm)
        gsi = q35_intx_gsi(edu.address, await edu.interrupt_pin())
        await vm.qtest.irq_intercept_in("ioapic")
        await edu.bar_writel(0, EDU_STATUS, EDU_STATUS_IRQ_ON_FACTORIAL)
        await edu.bar_writel(0, EDU_FACTORIAL, 5)
        with trio.fail_after(DEADLINE):
            await vm.qtest.wait_irq(gsi)
        assert not await edu.bar_readl(0, EDU_STATUS) & EDU_STATUS_COMPUTING
        assert await edu.bar_readl(0, EDU_FACTORIAL) == 120
        assert await edu.bar_readl(0, EDU_IRQ_STATUS) == 1
        await edu.bar_writel(0, EDU_IRQ_ACK, 1)
        with trio.fail_after(DEADLINE):
            await vm.qtest.wait_irq(gsi, raised=False)


async def test_msi_is_observed_in_guest_ram(qemu_binary: Path) -> None:
    async with machine(qemu_binary, devices=["edu"]) as vm:
        edu = await live_edu(vm)
        await vm.qtest.irq_intercept_in("ioapic")
        mailbox = await enable_msi(edu, vm.guest_memory.alloc(4, align=4))
        assert await mailbox.take() is None
        await edu.bar_writel(0, EDU_IRQ_RAISE, 0x2)
        with trio.fail_after(DEADLINE):
            assert await mailbox.wait() == 0
        assert await vm.qtest.readl(mailbox.address) == 0  # taken
        # With MSI on, the INTx line stays quiet.
        assert not vm.qtest.get_irq(q35_intx_gsi(edu.address, 1))


# -- DMA and the virtual clock ----------------------------------------------------------


async def edu_dma(vm: QemuMachine, edu: PciFunction, source: int, destination: int, count: int, command: int) -> None:
    await edu.bar_writeq(0, EDU_DMA_SOURCE, source)
    await edu.bar_writeq(0, EDU_DMA_DESTINATION, destination)
    await edu.bar_writeq(0, EDU_DMA_COUNT, count)
    await edu.bar_writeq(0, EDU_DMA_COMMAND, command | EDU_DMA_START)
    # edu runs the transfer from a virtual-clock timer, which only moves on request.
    while await edu.bar_readq(0, EDU_DMA_COMMAND) & EDU_DMA_START:
        await vm.qtest.clock_step()


async def test_device_dma_round_trips_through_guest_ram(qemu_binary: Path) -> None:
    async with machine(qemu_binary, devices=["edu"]) as vm:
        edu = await live_edu(vm)
        data = bytes(range(100))
        source = vm.guest_memory.alloc(len(data))
        destination = vm.guest_memory.alloc(len(data))
        await vm.qtest.memwrite(source, data)
        with trio.fail_after(DEADLINE):
            await edu_dma(vm, edu, source, EDU_DMA_BUFFER, len(data), 0)
            await edu_dma(vm, edu, EDU_DMA_BUFFER, destination, len(data), EDU_DMA_TO_RAM)
        assert await vm.qtest.memread(destination, len(data)) == data


# -- memory ---------------------------------------------------------------------------


async def test_memwrite_memread_round_trip(qemu_binary: Path) -> None:
    async with machine(qemu_binary) as vm:
        address = vm.guest_memory.alloc(8192)
        data = bytes(range(256)) * 32
        await vm.qtest.memwrite(address, data)
        assert await vm.qtest.memread(address, len(data)) == data
        assert await vm.qtest.memread(address + 255, 2) == b"\xff\x00"
        assert await vm.qtest.memread(address, 0) == b""
        await vm.qtest.memset(address, 16, 0xAB)
        assert await vm.qtest.memread(address, 17) == b"\xab" * 16 + b"\x10"


async def test_sized_accesses_are_little_endian(qemu_binary: Path) -> None:
    async with machine(qemu_binary) as vm:
        qtest = vm.qtest
        address = vm.guest_memory.alloc(16)
        await qtest.writeq(address, 0x1122_3344_5566_7788)
        assert await qtest.readq(address) == 0x1122_3344_5566_7788
        assert await qtest.readl(address) == 0x5566_7788
        assert await qtest.readw(address) == 0x7788
        assert await qtest.readb(address) == 0x88
        await qtest.writeb(address + 8, 0x01)
        await qtest.writew(address + 9, 0x0302)
        await qtest.writel(address + 11, 0x07060504)
        assert await qtest.memread(address + 8, 7) == bytes(range(1, 8))
        with pytest.raises(ValueError):
            await qtest.writeb(address, 0x100)


async def test_failed_qtest_command_raises(qemu_binary: Path) -> None:
    async with machine(qemu_binary) as vm:
        with pytest.raises(QTestError, match="Unknown command"):
            await vm.qtest.command("no_such_command")
        with pytest.raises(QTestError, match="Unknown device"):
            await vm.qtest.irq_intercept_in("/machine/no-such-device")
        assert await vm.qtest.readl(vm.guest_memory.alloc(4)) == 0  # still in step


# -- QMP ------------------------------------------------------------------------------


async def test_system_reset_clears_bar_programming(qemu_binary: Path) -> None:
    async with machine(qemu_binary, devices=["edu"]) as vm:
        edu = await live_edu(vm)
        assert await edu.read_config(0x04, 2) != 0
        await vm.qmp.system_reset()
        assert await edu.read_config(0x04, 2) == 0
        assert await edu.read_config(0x10) == 0


async def test_json_device_specs_are_accepted(qemu_binary: Path) -> None:
    async with machine(qemu_binary, devices=[{"driver": "edu", "id": "json-edu"}]) as vm:
        assert "json-edu" in [device["qdev_id"] for device in await vm.qmp.query_pci()]


async def test_hot_unplug_removes_a_hotplugged_device(qemu_binary: Path) -> None:
    # pc: ACPI hotplug on the root bus, so the device shows up on bus 0.
    async with machine(qemu_binary, machine="pc") as vm:
        bus = await vm.pci_bus()
        await vm.qmp.device_add(driver="edu", id="hot-edu")
        assert EDU in [(f.vendor_id, f.device_id) for f in await bus.enumerate()]
        assert "hot-edu" in [device["qdev_id"] for device in await vm.qmp.query_pci()]
        with trio.fail_after(DEADLINE):
            await vm.hot_unplug("hot-edu")
        assert EDU not in [(f.vendor_id, f.device_id) for f in await bus.enumerate()]
        assert "hot-edu" not in [device["qdev_id"] for device in await vm.qmp.query_pci()]


async def test_hot_unplug_behind_a_q35_root_port(qemu_binary: Path) -> None:
    async with machine(qemu_binary, devices=["pcie-root-port,id=rp0,chassis=1"]) as vm:
        await vm.qmp.device_add(driver="edu", id="hot-edu", bus="rp0")
        assert "hot-edu" in await vm.qmp.qom_list("/machine/peripheral")
        with trio.fail_after(DEADLINE):
            await vm.hot_unplug("hot-edu")
        assert "hot-edu" not in await vm.qmp.qom_list("/machine/peripheral")


async def test_hot_unplug_refuses_q35_root_bus(qemu_binary: Path) -> None:
    async with machine(qemu_binary, devices=["edu,id=fixed"]) as vm:
        with pytest.raises(HotplugError, match="no ACPI hotplug"):
            await vm.hot_unplug("fixed")


# -- process lifetime -----------------------------------------------------------------


async def test_qemu_is_gone_after_the_block(qemu_binary: Path) -> None:
    async with machine(qemu_binary) as vm:
        pid = vm.pid
        assert pid is not None and process_exists(pid)
    assert not process_exists(pid)
    assert vm.returncode is not None


async def test_qemu_is_gone_when_the_body_raises(qemu_binary: Path) -> None:
    vm = machine(qemu_binary)
    with pytest.raises(RuntimeError, match="boom"):
        async with vm:
            raise RuntimeError("boom")
    assert vm.pid is not None and not process_exists(vm.pid)


async def test_qemu_is_gone_when_the_body_is_cancelled(qemu_binary: Path) -> None:
    vm = machine(qemu_binary)
    with trio.CancelScope() as scope:
        async with vm:
            scope.cancel()
            await trio.sleep_forever()
    assert scope.cancelled_caught
    assert vm.pid is not None and not process_exists(vm.pid)


async def test_error_in_body_carries_qemu_stderr(qemu_binary: Path) -> None:
    vm = machine(qemu_binary, devices=["edu"], extra_args=["--trace", "pci_cfg_write"])
    with pytest.raises(KeyError) as caught:
        async with vm:
            await live_edu(vm)
            raise KeyError("device misbehaved")
    notes = "\n".join(caught.value.__notes__)
    assert "pci_cfg_write edu" in notes
    assert "terminating on signal" not in notes


async def test_bad_argument_reports_qemu_stderr(qemu_binary: Path) -> None:
    with pytest.raises(QemuStartError, match="-no-such-option: invalid option"):
        async with machine(qemu_binary, extra_args=["-no-such-option"]):
            pass


async def test_unknown_device_reports_qemu_stderr(qemu_binary: Path) -> None:
    with pytest.raises(QemuStartError, match="no-such-device"):
        async with machine(qemu_binary, devices=["no-such-device"]):
            pass


async def test_unexpected_exit_cancels_the_body(qemu_binary: Path) -> None:
    with pytest.raises(QemuExitedError) as caught:
        async with machine(qemu_binary) as vm:
            assert vm.pid is not None
            os.kill(vm.pid, signal.SIGKILL)
            await trio.sleep_forever()
    assert caught.value.returncode == -signal.SIGKILL


async def test_quit_is_an_expected_exit(qemu_binary: Path) -> None:
    async with machine(qemu_binary) as vm:
        assert await vm.quit() == 0


WITHOUT_QMP = """
import sys
sys.modules["qemu"] = None  # as if vdev were installed without its qemu extra
import trio
from vdev.qemu import QemuError, QemuMachine

async def main():
    try:
        async with QemuMachine(binary="/nonexistent/qemu"):
            pass
    except QemuError as exc:
        print(exc)

trio.run(main)
"""


def test_vdev_qemu_imports_without_qemu_qmp_and_a_machine_says_what_to_install() -> None:
    """Issue 15: ``import vdev.qemu`` failed with ``No module named 'qemu'`` without the extra."""
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_QMP], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "qemu.qmp package, which is missing" in result.stdout and "pip install 'vdev[qemu]'" in result.stdout
