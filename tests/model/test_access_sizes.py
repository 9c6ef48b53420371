"""Per-register access-size policies: what a register takes, and what a refused access does."""

from __future__ import annotations

import re

import pytest
import trio

from vdev import RO, RW, WO, AccessRefused, AccessSizes, Bar, DefinitionError, Device, Refusal, Register


class Sized(Device):
    bar0 = Bar(
        4096,
        registers=[
            Register("word", 0x0, access=RW, reset=0x11223344, sizes=AccessSizes(reads=(4,), writes=(4,))),
            Register("plain", 0x4, access=RW, reset=0x55667788),
            Register("kick", 0x8, access=WO, sizes=AccessSizes(reads=(), writes=(4,), fill=0xA5)),
            Register("wide", 0x10, width=8, access=RW, sizes=AccessSizes(reads=(4, 8), writes=(4, 8))),
            Register(
                "latch", 0x18, width=8, access=RW, sizes=AccessSizes(reads=(4, 8), writes=(4, 8), zero_extend=True)
            ),
            Register(
                "strict", 0x20, access=RO, reset=7, sizes=AccessSizes(reads=(4,), writes=(), refused=Refusal.ERROR)
            ),
        ],
    )
    bar2 = Bar(4096, sizes=AccessSizes(reads=(4,), writes=(4,), fill=0x00), registers=[Register("r", 0x0, access=RW)])

    def __init__(self) -> None:
        super().__init__()
        self.command_control.force(memory=True)
        self.written: list[tuple[str, int]] = []

    @bar0.on_write("word")
    def wrote_word(self, value: int) -> None:
        self.written.append(("word", value))

    @bar0.on_write("kick")
    def kicked(self, value: int) -> None:
        self.written.append(("kick", value))


def read(device: Device, offset: int, size: int, bar: int = 0) -> int:
    return int.from_bytes(trio.run(device.region_read, bar, offset, size), "little")


def write(device: Device, offset: int, size: int, value: int, bar: int = 0) -> None:
    trio.run(device.region_write, bar, offset, value.to_bytes(size, "little"))


def test_an_accepted_access_behaves_as_without_a_policy() -> None:
    device = Sized()
    assert read(device, 0x0, 4) == 0x11223344
    write(device, 0x0, 4, 0xCAFEF00D)
    assert read(device, 0x0, 4) == 0xCAFEF00D
    assert device.written == [("word", 0xCAFEF00D)]


@pytest.mark.parametrize(
    ("offset", "size"),
    [(0x0, 1), (0x0, 2), (0x2, 2), (0x1, 4), (0x0, 8), (0x12, 2), (0x14, 4)],
    ids=["narrow", "half", "upper half", "misaligned", "wider, over the next register", "inside", "upper dword"],
)
def test_a_refused_read_returns_the_fill_and_a_refused_write_changes_nothing(offset: int, size: int) -> None:
    device = Sized()
    before = dict(device.bar(0).registers.values)
    assert read(device, offset, size) == int.from_bytes(b"\xff" * size, "little")
    write(device, offset, size, 0)
    assert device.bar(0).registers.values == before
    assert device.written == []


def test_a_register_without_a_policy_next_to_one_keeps_taking_everything() -> None:
    device = Sized()
    assert read(device, 0x4, 1) == 0x88
    write(device, 0x6, 2, 0xABCD)
    assert read(device, 0x4, 4) == 0xABCD7788


def test_a_write_only_register_refusing_reads_answers_its_fill() -> None:
    device = Sized()
    write(device, 0x8, 4, 0x1234)
    assert device.written == [("kick", 0x1234)]
    assert read(device, 0x8, 4) == 0xA5A5A5A5


def test_a_narrow_write_merges_or_replaces_as_declared() -> None:
    device = Sized()
    for offset in (0x10, 0x18):
        write(device, offset, 8, 0x1_2345_6789)
        write(device, offset, 4, 0xABCD)
    assert read(device, 0x10, 8) == 0x1_0000_ABCD  # merged: the upper half stays
    assert read(device, 0x18, 8) == 0xABCD  # zero-extended: the whole register replaced
    assert read(device, 0x18, 4) == 0xABCD


def test_an_error_policy_fails_the_access() -> None:
    device = Sized()
    with pytest.raises(AccessRefused, match=r"2-byte read at 0x20 to register 'strict' at 0x20 \(accepted sizes: 4\)"):
        read(device, 0x20, 2)
    with pytest.raises(AccessRefused, match=r"4-byte write at 0x20 .* \(accepted sizes: none\)"):
        write(device, 0x20, 4, 1)
    assert read(device, 0x20, 4) == 7


def test_a_bar_policy_refuses_before_any_register_sees_the_access() -> None:
    device = Sized()
    write(device, 0x0, 4, 0x01020304, bar=2)
    write(device, 0x0, 2, 0xFFFF, bar=2)
    assert read(device, 0x0, 2, bar=2) == 0  # its fill
    assert read(device, 0x0, 4, bar=2) == 0x01020304
    assert read(device, 0x100, 1, bar=2) == 0


@pytest.mark.parametrize(
    ("register", "message"),
    [
        (
            lambda: Register("r", 0x0, sizes=AccessSizes(reads=(8,))),
            "register 'r' at 0x0: accepts 8-byte accesses, wider than the register (4 bytes)",
        ),
        (lambda: Register("r", 0x0, sizes=AccessSizes(writes=(3,))), "access size 3 is not one of (1, 2, 4, 8)"),
        (lambda: Register("r", 0x0, sizes=AccessSizes(fill=0x100)), "fill is one byte (0..0xff), not 256"),
    ],
)
def test_a_policy_that_cannot_work_is_refused_when_declared(register: object, message: str) -> None:
    with pytest.raises(DefinitionError, match=re.escape(message)):
        register()  # type: ignore[operator]


def test_a_bar_policy_that_cannot_work_names_the_device() -> None:
    with pytest.raises(DefinitionError, match=r"Broken.bar0: sizes: access size 16 is not one of"):

        class Broken(Device):
            bar0 = Bar(4096, sizes=AccessSizes(reads=(16,)), registers=[Register("r", 0x0, access=RO)])
