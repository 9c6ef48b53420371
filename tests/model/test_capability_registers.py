"""Capabilities declared as registers: the declarations are complete, drawn, and what the model reads by name."""

from __future__ import annotations

import inspect

import pytest
import trio

from vdev import (
    Bar,
    Device,
    DeviceSerialNumber,
    Msi,
    MsiX,
    PciExpress,
    PowerManagement,
    VendorSpecific,
    VendorSpecificExtended,
)
from vdev.model.capabilities import Capability
from vdev.model.events import Irq, Reset
from vdev.model.registers import Field

DECLARED: list[Capability] = [
    PowerManagement(),
    Msi(vectors=1),
    Msi(vectors=8, per_vector_mask=True),
    MsiX(vectors=4, table_bar=0, table_offset=0, pba_bar=0, pba_offset=0x40),
    PciExpress(flr=True),
    PciExpress(flr=False),
    VendorSpecific(data=b"abcde"),
    DeviceSerialNumber(serial=7),
    VendorSpecificExtended(vsec_id=1, data=b"xyz"),
]


@pytest.mark.parametrize("capability", DECLARED, ids=repr)
def test_registers_tile_the_capability_without_gaps_or_overlaps(capability: Capability) -> None:
    """Every byte before the vendor data belongs to exactly one declared register."""
    at = 0
    for register in sorted(capability.registers(), key=lambda r: r.offset):
        assert register.offset == at, f"{register.name} at {register.offset:#x}, expected {at:#x}"
        at = register.end
    assert at + len(capability.trailer()) == capability.size


@pytest.mark.parametrize("capability", DECLARED, ids=repr)
def test_the_docstring_draws_every_register(capability: Capability) -> None:
    doc = inspect.getdoc(type(capability)) or ""
    assert "+---" in doc, f"{type(capability).__name__} has no layout diagram"
    header = {r.name for r in capability.header()}
    missing = [r.name for r in capability.registers() if r.name not in header and r.name not in doc]
    assert not missing, f"{type(capability).__name__}'s diagram does not name {missing}"


class Express(Device):
    express = True
    bar0 = Bar(4096)

    def __init__(self, flr: bool = True) -> None:
        self.flr = flr
        super().__init__()

    def capabilities(self) -> list[Capability]:
        return [PowerManagement(), Msi(vectors=4, per_vector_mask=True), PciExpress(flr=self.flr)]


def write(device: Device, offset: int, size: int, value: int) -> None:
    trio.run(device.region_write, 7, offset, value.to_bytes(size, "little"))


def resets(device: Device) -> list[str]:
    return [e.reason for e in device.events.of_kind(Reset)]


@pytest.mark.parametrize(
    ("byte", "size", "value", "expected"),
    [
        (0, 2, 0x8000, ["flr"]),  # the whole register
        (1, 1, 0x80, ["flr"]),  # only its high byte
        (0, 4, 0x8000, ["flr"]),  # with device status
        (0, 1, 0xFF, []),  # the low byte cannot reach bit 15
        (-2, 4, 0x8000_0000, ["flr"]),  # a dword write starting at device_capabilities' upper half
        (-2, 4, 0x0000_8000, []),  # ... whose bit 15 lands in device_capabilities, read-only
    ],
)
def test_initiate_flr_is_found_by_name_whatever_the_write_covers(
    byte: int, size: int, value: int, expected: list[str]
) -> None:
    device = Express()
    control = device.config.find(PciExpress).register("device_control")  # type: ignore[union-attr]
    write(device, control.offset + byte, size, value)
    assert resets(device) == expected
    assert device.config.read_register(control) & control.field("initiate_flr").mask == 0


def test_no_flr_without_the_capability_bit() -> None:
    device = Express(flr=False)
    control = device.config.find(PciExpress).register("device_control")  # type: ignore[union-attr]
    write(device, control.offset, 2, 0x8000)
    assert resets(device) == []


def test_pmcsr_power_state_is_the_only_writable_field() -> None:
    device = Express()
    pmcsr = device.config.find(PowerManagement).register("pmcsr")  # type: ignore[union-attr]
    write(device, pmcsr.offset, 2, 0xFFFF)
    value = device.config.read_register(pmcsr)
    assert pmcsr.field("power_state").extract(value) == 3
    assert pmcsr.field("no_soft_reset").extract(value) == 1
    assert value == 0x000B


def test_msi_mask_bits_are_as_wide_as_the_vectors() -> None:
    device = Express()
    mask = device.config.find(Msi).register("mask_bits")  # type: ignore[union-attr]
    write(device, mask.offset, 4, 0xFFFF_FFFF)
    assert device.config.read_register(mask) == 0xF


def test_msi_per_vector_mask_holds_a_vector_pending_until_unmasked() -> None:
    """The interrupt rules read mask and pending bits through the named registers."""
    device = Express()
    placed = device.config.find(Msi)
    assert placed is not None
    control, mask, pending = (placed.register(n) for n in ("message_control", "mask_bits", "pending_bits"))
    write(device, mask.offset, 4, 0b10)
    write(device, control.offset, 2, control.field("multiple_message_enable").insert(1, 2))
    device.irq.trigger(1)
    assert device.config.read_register(pending) == 0b10
    write(device, mask.offset, 4, 0)
    assert device.config.read_register(pending) == 0
    fired = [e.vector for e in device.events.of_kind(Irq)]
    assert fired == [1]


def test_unknown_register_names_say_what_there_is() -> None:
    placed = Express().config.find(PowerManagement)
    assert placed is not None
    with pytest.raises(KeyError, match=r"PowerManagement has no register 'pmscr' \(registers: cap_id, next, pmc,"):
        placed.register("pmscr")


def test_a_field_value_must_fit() -> None:
    with pytest.raises(ValueError, match="field 'state' is 2 bits wide; 0x4 does not fit"):
        Field("state", 0, 2).insert(0, 4)
