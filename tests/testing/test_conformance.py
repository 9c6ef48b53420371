"""The PCI conformance checker: every bundled device passes, on the bench and served; each rule it checks can fail."""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest

from vdev import (
    Bar,
    DefinitionError,
    Device,
    DeviceSerialNumber,
    Msi,
    MsiX,
    PciExpress,
    PowerManagement,
    RawCapability,
    Register,
)
from vdev.model.bars import BarKind
from vdev.model.pci_regs import PCI_COMMAND, PCI_INTERRUPT_LINE
from vdev.testing import ConformanceError, ConnectClient, OpenBench, SizedBar, check_pci_conformance
from vdev_devices.edu import Edu
from vdev_devices.hello import Hello
from vdev_devices.idio16 import Idio16
from vdev_devices.membar import MemBar
from vdev_devices.nvme import Nvme

BUNDLED: dict[str, Callable[[], Device]] = {
    "hello": Hello,
    "edu": Edu,
    "idio16": Idio16,
    "membar": lambda: MemBar(size="1M"),
    "nvme": lambda: Nvme(size="1M"),
}


def declared_bars(device: Device) -> dict[int, SizedBar]:
    return {
        state.index: SizedBar(state.index, state.spec.kind, state.spec.size, state.spec.prefetchable)
        for state in device.bars()
    }


@pytest.mark.parametrize("name", BUNDLED)
async def test_every_bundled_device_conforms_on_the_bench_and_is_left_as_found(
    vdev_bench: OpenBench, name: str
) -> None:
    bench = await vdev_bench(BUNDLED[name]())
    await bench.enable(memory=True, io=True, master=True)
    await bench.config_write(PCI_INTERRUPT_LINE, 11, 1)
    before = bytes(bench.device.config.data[:0x40])
    report = await check_pci_conformance(bench, device=bench.device)
    assert report.bars == declared_bars(bench.device)
    assert [cap_id for _, cap_id in report.capabilities] == [
        placed.capability.cap_id for placed in bench.device.config.capabilities if not placed.capability.extended
    ]
    assert bytes(bench.device.config.data[:0x40]) == before  # COMMAND, BARs and Interrupt Line put back


@pytest.mark.parametrize("name", BUNDLED)
async def test_every_bundled_device_conforms_through_libvfio_user(vdev_client: ConnectClient, name: str) -> None:
    device = BUNDLED[name]()
    client = await vdev_client(device)
    report = await check_pci_conformance(client, device=device)
    assert report.bars == declared_bars(device)


class Sample(Device):
    """A healthy Express device with a bit of everything the checker looks at."""

    vendor_id = 0x1B36
    device_id = 0x5A3E
    express = True
    rom_size = 4096
    bar0 = Bar(4096, registers=[Register("r", 0)])
    bar2 = Bar(1 << 20, kind="mem64", prefetchable=True)
    bar4 = Bar(64, kind="io")

    def capabilities(self) -> list[PowerManagement | Msi | MsiX | PciExpress | DeviceSerialNumber]:
        return [
            PowerManagement(),
            Msi(vectors=4, per_vector_mask=True),
            MsiX(vectors=8, table_bar=0, table_offset=0x800, pba_bar=0, pba_offset=0xC00),
            PciExpress(),
            DeviceSerialNumber(serial=42),
        ]


async def test_the_healthy_sample_conforms_and_is_reported_in_full(vdev_bench: OpenBench) -> None:
    bench = await vdev_bench(Sample())
    report = await check_pci_conformance(bench, device=bench.device)
    assert report.bars == {
        0: SizedBar(0, BarKind.MEM32, 4096, False),
        2: SizedBar(2, BarKind.MEM64, 1 << 20, True),
        4: SizedBar(4, BarKind.IO, 64, False),
    }
    assert report.rom_size == 4096
    assert [cap_id for _, cap_id in report.capabilities] == [0x01, 0x05, 0x11, 0x10]
    assert report.extended_capabilities == ((0x100, 0x0003),)


def capability(device: Device, kind: type) -> int:
    placed = device.config.find(kind)
    assert placed is not None
    return placed.offset


def writable(offset: int, mask: int, size: int = 1) -> Callable[[Device], None]:
    def breaking(device: Device) -> None:
        for i in range(size):
            device.config.wmask[offset + i] |= mask >> (8 * i) & 0xFF

    return breaking


def poke(offset_of: Callable[[Device], int], value: int, size: int = 1) -> Callable[[Device], None]:
    def breaking(device: Device) -> None:
        device.config.write_int(offset_of(device), size, value)

    return breaking


def clear_w1c(device: Device) -> None:
    device.config.w1cmask[0x06:0x08] = b"\0\0"


def unsizable_bar0(device: Device) -> None:
    device.config.wmask[0x10:0x14] = bytes(4)


def loop_standard(device: Device) -> None:
    first = capability(device, PowerManagement)
    device.config.data[capability(device, PciExpress) + 1] = first


def loop_extended(device: Device) -> None:
    device.config.write_int(0x100, 4, 0x0001_0003 | 0x100 << 20)


def read_only_line(device: Device) -> None:
    device.config.wmask[PCI_INTERRUPT_LINE] = 0


def sticky_device_status(device: Device) -> None:
    device.config.w1cmask[capability(device, PciExpress) + 10] = 0


BROKEN: dict[str, tuple[Callable[[Device], None], str]] = {
    "writable IDs": (writable(0x00, 0xFFFF, 2), "vendor and device ID at 0x0 is writable"),
    "writable class": (writable(0x0B, 0xFF), "revision and class code at 0x8 is writable"),
    "writable capability pointer": (writable(0x34, 0xFC), "capability pointer at 0x34 is writable"),
    "COMMAND reserved bit": (writable(PCI_COMMAND + 1, 0x80), "COMMAND reserved bits read 0x8000"),
    "STATUS read-only bit": (writable(0x06, 0x80), "writing ones to STATUS set bits 0x0080"),
    "RW1C that does not clear": (clear_w1c, "writing 1 to RW1C bit 8 does not clear it"),
    "BAR that does not size": (unsizable_bar0, "BAR0 (mem32, 0x1000 bytes) is declared but does not size"),
    "reserved header byte": (writable(0x38, 0xFF), "reserved header byte 0x38 is writable"),
    "read-only Interrupt Line": (read_only_line, "Interrupt Line does not keep what software writes"),
    "misaligned pointer": (poke(lambda d: 0x34, 0x42), "capability pointer 0x42 is outside 0x40-0xfc"),
    "chain loop": (loop_standard, "the capability chain loops back to"),
    "extended chain loop": (loop_extended, "the extended capability chain loops back to 0x100"),
    "writable MSI-X table size": (
        lambda d: writable(capability(d, MsiX) + 2, 0x7FF, 2)(d),
        "MSI-X table size at",
    ),
    "writable MSI capable bits": (
        lambda d: writable(capability(d, Msi) + 2, 0x0E)(d),
        "MSI control bits 0x000e",
    ),
    "capability header written": (
        lambda d: writable(capability(d, Msi), 0xFF)(d),
        "capability header at",
    ),
    "IDs not as declared": (poke(lambda d: 0x02, 0xBEEF, 2), "vendor:device reads 0xbeef1b36, declared 0x5a3e1b36"),
    "PCIe Device Status RW1C": (
        sticky_device_status,
        "PCI Express Device Status: writing 1 to RW1C bit 0 does not clear it",
    ),
}


@pytest.mark.parametrize("broken", BROKEN)
async def test_each_rule_catches_a_device_that_breaks_it(vdev_bench: OpenBench, broken: str) -> None:
    breaking, problem = BROKEN[broken]
    device = Sample()
    breaking(device)
    bench = await vdev_bench(device)
    with pytest.raises(ConformanceError) as caught:
        await check_pci_conformance(bench, device=device)
    assert any(problem in line for line in caught.value.problems), caught.value


class MisplacedTable(Device):
    """An MSI-X table past the end of its BAR, in raw capability bytes the model does not interpret.

    Declared with ``MsiX`` the model itself refuses it (``DefinitionError``);
    a server written without vdev can still offer it, which is what the
    checker is for.
    """

    vendor_id = 0x1B36
    device_id = 0x7AB1
    bar0 = Bar(4096)

    def capabilities(self) -> list[RawCapability]:
        # Message control: 8 vectors; table at BAR0+0x1000; PBA at BAR0+0x800.
        return [RawCapability(cap_id=0x11, data=struct.pack("<HII", 8 - 1, 0x1000 | 0, 0x800 | 0))]


def test_the_model_refuses_an_msix_table_outside_its_bar() -> None:
    class Refused(Device):
        bar0 = Bar(4096)

        def capabilities(self) -> list[MsiX]:
            return [MsiX(vectors=8, table_bar=0, table_offset=0x1000, pba_bar=0, pba_offset=0x800)]

    with pytest.raises(DefinitionError, match=r"MSI-X table at BAR0\+0x1000 \(128 bytes\) ends beyond BAR0"):
        Refused()


async def test_an_msix_table_outside_its_bar_is_caught(vdev_bench: OpenBench) -> None:
    bench = await vdev_bench(MisplacedTable())
    with pytest.raises(ConformanceError, match=r"MSI-X table \(0x1000\+0x80\) does not fit in BAR0"):
        await check_pci_conformance(bench)


async def test_without_the_device_only_what_a_client_sees_is_checked(vdev_bench: OpenBench) -> None:
    """No declarations to compare with and no way to set RW1C bits: a broken RW1C goes unnoticed."""
    device = Sample()
    clear_w1c(device)
    bench = await vdev_bench(device)
    report = await check_pci_conformance(bench)
    assert set(report.bars) == {0, 2, 4}
