"""A wrongly declared device is refused when its class is created, with one line naming what is wrong.

Issue 15 found these accepted silently (two registers with one name, a
register under the MSI-X table) or refused with a traceback that named
neither the device nor the BAR.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from vdev import RW, Bar, DefinitionError, Device, DisabledMapping, MsiX, Register


def outside() -> type[Device]:
    class Thermo(Device):
        bar0 = Bar(4096, registers=[Register("status", 0x1000)])

    return Thermo


def bad_size() -> type[Device]:
    class Thermo(Device):
        bar2 = Bar(3000)

    return Thermo


def in_mapped_area() -> type[Device]:
    class Thermo(Device):
        bar0 = Bar(8192, registers=[Register("status", 0x10)], mapped=[(0, 4096)])

    return Thermo


def unaligned_mapped_area() -> type[Device]:
    class Thermo(Device):
        bar0 = Bar(8192, mapped=[(0x100, 4096)])

    return Thermo


def hook_on_unknown_register() -> type[Device]:
    class Thermo(Device):
        bar0 = Bar(4096, registers=[Register("status", 0x0)])

        @bar0.on_read("stauts")
        def read_status(self) -> int:
            return 1

    return Thermo


def same_name_twice() -> type[Device]:
    class Thermo(Device):
        bar0 = Bar(4096, registers=[Register("status", 0x0), Register("status", 0x4)])

    return Thermo


def overlapping() -> type[Device]:
    class Thermo(Device):
        bar0 = Bar(4096, registers=[Register("count", 0x0, width=8), Register("status", 0x4)])

    return Thermo


def vendor_too_wide() -> type[Device]:
    class Thermo(Device):
        vendor_id = 0x12345

    return Thermo


def policy_typo() -> type[Device]:
    class Thermo(Device):
        bar0 = Bar(4096, mapping_when_disabled="revok")

    return Thermo


def unnamed_bar() -> type[Device]:
    class Thermo(Device):
        registers = Bar(4096)

    return Thermo


@pytest.mark.parametrize(
    ("declare", "message"),
    [
        (outside, "Thermo.bar0: register 'status' at 0x1000 (4 bytes) lies outside the BAR (0x1000 bytes)"),
        (bad_size, "Thermo.bar2: size must be a power of two, not 3000"),
        (in_mapped_area, "Thermo.bar0: register 'status' at 0x10 (4 bytes) lies in the mapped area at 0x0"),
        (unaligned_mapped_area, "mapped area at 0x100 (4096 bytes) must be whole pages"),
        (hook_on_unknown_register, "Thermo.bar0: on_read('stauts') on read_status: no such register"),
        (same_name_twice, "Thermo.bar0: two registers named 'status' (at 0x0 and 0x4 (4 bytes))"),
        (overlapping, "Thermo.bar0: registers 'count' at 0x0 (8 bytes) and 'status' at 0x4 (4 bytes) overlap"),
        (vendor_too_wide, "Thermo.vendor_id = 74565 does not fit in 16 bits"),
        (policy_typo, "mapping_when_disabled must be one of 'keep', 'revoke', 'discard'"),
        (unnamed_bar, "Thermo.registers: name the attribute bar0..bar5 or pass index="),
    ],
)
def test_a_bad_declaration_is_refused_when_the_class_is_created(
    declare: Callable[[], type[Device]], message: str
) -> None:
    with pytest.raises(DefinitionError) as caught:
        declare()
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_bad_register_names_itself_and_its_offset() -> None:
    with pytest.raises(DefinitionError, match=r"register 'status' at 0x8: width must be 1, 2, 4 or 8 bytes, not 3"):
        Register("status", 0x8, width=3)


class Shadowed(Device):
    """Its register sits where the MSI-X table is: the table would shadow it."""

    bar0 = Bar(4096, registers=[Register("status", 0x800, access=RW)])

    def capabilities(self) -> list[MsiX]:
        return [MsiX(vectors=2, table_bar=0, table_offset=0x800, pba_bar=0, pba_offset=0xC00)]


class PbaOnTable(Device):
    bar0 = Bar(4096)

    def capabilities(self) -> list[MsiX]:
        return [MsiX(vectors=2, table_bar=0, table_offset=0x800, pba_bar=0, pba_offset=0x810)]


class PbaBeyondBar(Device):
    bar0 = Bar(4096)

    def capabilities(self) -> list[MsiX]:
        return [MsiX(vectors=2, table_bar=0, table_offset=0x800, pba_bar=0, pba_offset=0x1000)]


@pytest.mark.parametrize(
    ("device", "message"),
    [
        (Shadowed, "Shadowed: MSI-X table at BAR0+0x800 (32 bytes) overlaps register 'status' at 0x800 (4 bytes)"),
        (PbaOnTable, "PbaOnTable: MSI-X table at BAR0+0x800 (32 bytes) and PBA at +0x810 (8 bytes) overlap"),
        (PbaBeyondBar, "PbaBeyondBar: MSI-X PBA at BAR0+0x1000 (8 bytes) ends beyond BAR0 (0x1000 bytes)"),
    ],
)
def test_msix_structures_must_not_collide_with_the_layout(device: type[Device], message: str) -> None:
    """Capabilities may depend on parameters, so this is checked when the device is created."""
    with pytest.raises(DefinitionError) as caught:
        device()
    assert message in str(caught.value)


class Policies(Device):
    bar0 = Bar(4096)


def test_policy_setters_take_the_documented_strings_and_refuse_the_rest() -> None:
    bar = Policies().bar(0)
    bar.mapping_when_disabled = "revoke"
    assert bar.mapping_when_disabled is DisabledMapping.REVOKE
    bar.prefault = "populate"
    bar.when_disabled = "error"
    with pytest.raises(ValueError, match="mapping_when_disabled must be one of 'keep', 'revoke', 'discard'"):
        bar.mapping_when_disabled = "revok"
    assert bar.mapping_when_disabled is DisabledMapping.REVOKE


def test_register_values_from_device_code_must_be_integers() -> None:
    class Counter(Device):
        bar0 = Bar(4096, registers=[Register("count", 0x0, width=2)])

    bar = Counter().bar(0)
    bar["count"] = 0x1_0001
    assert bar["count"] == 1  # wraps like the hardware register
    with pytest.raises(TypeError, match="register 'count' holds an integer, not str"):
        bar["count"] = "5"
    with pytest.raises(KeyError, match=r"no register 'cnt' here \(registers: count\)"):
        bar["cnt"]
