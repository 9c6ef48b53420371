"""Config space as a client sees it: read-only fields, BAR sizing, RW1C status, capability chains."""

from __future__ import annotations

import struct

import pytest

from vdev import (
    RO,
    RW,
    RW1C,
    W1S,
    Bar,
    Device,
    DeviceSerialNumber,
    Field,
    Msi,
    MsiX,
    PciExpress,
    PowerManagement,
    Register,
    VendorSpecific,
    VendorSpecificExtended,
)
from vdev.model.events import Reset
from vdev.model.pci_regs import PCI_STATUS_CAP_LIST


class Sample(Device):
    vendor_id = 0x1234
    device_id = 0x5678
    subsystem_vendor_id = 0xAAAA
    subsystem_id = 0xBBBB
    revision = 3
    class_code = 0x058000
    express = True
    bar0 = Bar(4096, registers=[Register("r", 0)])
    bar2 = Bar(1 << 20, kind="mem64", prefetchable=True, mapped=[(0, 1 << 20)])
    bar4 = Bar(8192)
    bar5 = Bar(32, kind="io")

    def capabilities(self) -> list:  # type: ignore[type-arg]
        return [
            PowerManagement(),
            Msi(vectors=4, per_vector_mask=True),
            MsiX(vectors=8, table_bar=4, table_offset=0, pba_bar=4, pba_offset=0x1000),
            PciExpress(),
            VendorSpecific(data=b"vdev"),
            DeviceSerialNumber(serial=0x0102030405060708),
            VendorSpecificExtended(vsec_id=0x42, data=b"\x01\x02\x03\x04"),
        ]


def cfg_write(device: Device, offset: int, size: int, value: int) -> None:
    device.config.write(offset, value.to_bytes(size, "little"))


def cfg_read(device: Device, offset: int, size: int) -> int:
    return int.from_bytes(device.config.read(offset, size), "little")


def test_identity_is_read_only() -> None:
    device = Sample()
    assert cfg_read(device, 0, 4) == 0x56781234
    assert cfg_read(device, 0x2C, 4) == 0xBBBBAAAA
    assert cfg_read(device, 0x08, 4) == 0x05800003
    cfg_write(device, 0, 4, 0xFFFFFFFF)
    cfg_write(device, 0x08, 4, 0)
    cfg_write(device, 0x2C, 4, 0)
    assert cfg_read(device, 0, 4) == 0x56781234
    assert cfg_read(device, 0x08, 4) == 0x05800003
    assert cfg_read(device, 0x2C, 4) == 0xBBBBAAAA


def test_bar_sizing_masks() -> None:
    device = Sample()
    for offset in range(0x10, 0x28, 4):
        cfg_write(device, offset, 4, 0xFFFFFFFF)
    assert cfg_read(device, 0x10, 4) == 0xFFFFF000  # 4 KiB, 32-bit memory
    assert cfg_read(device, 0x14, 4) == 0  # unimplemented
    assert cfg_read(device, 0x18, 4) == 0xFFF0000C  # 1 MiB, 64-bit, prefetchable
    assert cfg_read(device, 0x1C, 4) == 0xFFFFFFFF  # upper half of the 64-bit BAR
    assert cfg_read(device, 0x20, 4) == 0xFFFFE000
    assert cfg_read(device, 0x24, 4) == 0xFFFFFFE1  # 32-byte I/O BAR


def test_bar_address_round_trip() -> None:
    device = Sample()
    cfg_write(device, 0x18, 4, 0xC0100000)
    cfg_write(device, 0x1C, 4, 0x1)
    assert device.config.bar_address(2) == 0x1_C010_0000
    cfg_write(device, 0x10, 2, 0x3456)  # a 2-byte write into the BAR low half
    assert cfg_read(device, 0x10, 4) == 0x3000


def test_command_decoding_and_status_rw1c() -> None:
    device = Sample()
    cfg_write(device, 0x04, 2, 0xFFFF)
    assert device.command.memory and device.command.io and device.command.master
    assert cfg_read(device, 0x04, 2) == 0x0547
    status_at = 0x06
    device.config.write_int(status_at, 2, 0xF900 | PCI_STATUS_CAP_LIST)
    cfg_write(device, status_at, 2, 0x0800)  # clear "signaled target abort" only
    assert cfg_read(device, status_at, 2) == 0xF100 | PCI_STATUS_CAP_LIST
    cfg_write(device, status_at, 2, 0x0010)  # the capability-list bit is read-only
    assert cfg_read(device, status_at, 2) & PCI_STATUS_CAP_LIST


def walk_standard(device: Device) -> list[tuple[int, int]]:
    chain, pointer = [], cfg_read(device, 0x34, 1)
    while pointer:
        assert pointer % 4 == 0 and pointer >= 0x40
        chain.append((pointer, cfg_read(device, pointer, 1)))
        pointer = cfg_read(device, pointer + 1, 1)
        assert len(chain) < 48
    return chain


def walk_extended(device: Device) -> list[tuple[int, int]]:
    chain, pointer = [], 0x100
    while pointer:
        header = cfg_read(device, pointer, 4)
        chain.append((pointer, header & 0xFFFF))
        pointer = header >> 20
    return chain


def test_capability_chains_are_well_formed() -> None:
    device = Sample()
    assert cfg_read(device, 0x06, 2) & PCI_STATUS_CAP_LIST
    assert [cap_id for _, cap_id in walk_standard(device)] == [0x01, 0x05, 0x11, 0x10, 0x09]
    assert [cap_id for _, cap_id in walk_extended(device)] == [0x0003, 0x000B]
    dsn_at = walk_extended(device)[0][0]
    assert struct.unpack_from("<Q", device.config.read(dsn_at + 4, 8)) == (0x0102030405060708,)


def test_msix_capability_points_at_table_and_pba() -> None:
    device = Sample()
    msix_at = dict((cap_id, at) for at, cap_id in walk_standard(device))[0x11]
    assert cfg_read(device, msix_at + 2, 2) & 0x7FF == 7
    assert cfg_read(device, msix_at + 4, 4) == 0x0000 | 4
    assert cfg_read(device, msix_at + 8, 4) == 0x1000 | 4


def test_pcie_flr_bit_reads_back_zero_and_resets() -> None:
    import trio

    device = Sample()
    pcie_at = dict((cap_id, at) for at, cap_id in walk_standard(device))[0x10]
    cfg_write(device, 0x04, 2, 0x6)
    trio.run(device.region_write, 7, pcie_at + 8, (0x8000).to_bytes(2, "little"))
    assert cfg_read(device, pcie_at + 8, 2) & 0x8000 == 0
    assert device.command.value == 0
    assert [e.reason for e in device.events.of_kind(Reset)] == ["flr"]


def test_capabilities_must_fit() -> None:
    class TooMany(Device):
        def capabilities(self) -> list:  # type: ignore[type-arg]
            return [VendorSpecific(data=bytes(60)) for _ in range(4)]

    with pytest.raises(ValueError, match="do not fit"):
        TooMany()


def test_extended_capability_needs_express() -> None:
    class Conventional(Device):
        def capabilities(self) -> list:  # type: ignore[type-arg]
            return [DeviceSerialNumber(serial=1)]

    with pytest.raises(ValueError, match="PCI Express"):
        Conventional()


class WithConfigRegisters(Device):
    express = True

    def config_registers(self) -> list[Register]:
        return [
            Register("errors", 0x180, width=4, access=RW1C, reset=0x10),
            Register("control", 0x188, width=2, access=RO, fields=(Field("enable", 0, 1, RW),)),
        ]


def test_config_registers_follow_their_access_types_and_reset() -> None:
    device = WithConfigRegisters()
    assert cfg_read(device, 0x180, 4) == 0x10
    device.config.write_int(0x180, 4, 0x13)
    cfg_write(device, 0x180, 4, 0x11)
    assert cfg_read(device, 0x180, 4) == 0x02
    cfg_write(device, 0x188, 2, 0xFFFF)
    assert cfg_read(device, 0x188, 2) == 0x1
    device.config.reset()
    assert (cfg_read(device, 0x180, 4), cfg_read(device, 0x188, 2)) == (0x10, 0)


@pytest.mark.parametrize(
    ("register", "express", "message"),
    [
        (Register("x", 0x3C, width=4), False, "overlaps the header"),
        (Register("x", 0x100, width=4), True, "extended capability header"),
        (Register("x", 0x1FE, width=4), False, "outside the 256-byte"),
        (Register("x", 0x180, width=4, access=W1S), True, "only RO, RW and RW1C"),
        (Register("x", 0x40, width=4), True, "overlaps PciExpress"),
    ],
)
def test_config_registers_are_checked(register: Register, express: bool, message: str) -> None:
    class Bad(Device):
        def capabilities(self) -> list:  # type: ignore[type-arg]
            return [PciExpress()] if self.express else []

        def config_registers(self) -> list[Register]:
            return [register]

    Bad.express = express
    with pytest.raises(ValueError, match=message):
        Bad()
