"""Register dispatch: sizes, alignment, access types and hooks (plain and async)."""

from __future__ import annotations

import trio

from vdev import RO, RW, RW1C, W1S, WO, Bar, Device, Field, Register


class Regs(Device):
    bar0 = Bar(
        4096,
        registers=[
            Register("a", 0x0, width=4, access=RW, reset=0x11223344),
            Register("b", 0x4, width=4, access=RO, reset=0xAABBCCDD),
            Register("status", 0x8, width=4, access=RW1C, reset=0xFF),
            Register("set", 0xC, width=4, access=W1S),
            Register("secret", 0x10, width=4, access=WO),
            Register("q", 0x18, width=8, access=RW),
            Register(
                "mixed", 0x20, width=4, access=RW, fields=(Field("ro_low", 0, 8, RO), Field("w1c_top", 24, 8, RW1C))
            ),
            Register("slow", 0x30, width=4),
        ],
    )

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[int] = []
        self.command_control.force(memory=True)

    @bar0.on_write("a")
    def wrote_a(self, value: int) -> None:
        self.writes.append(value)

    @bar0.on_read("slow")
    async def read_slow(self) -> int:
        await trio.sleep(0.01)
        return 0x5105


async def rd(d: Device, off: int, size: int) -> int:
    return int.from_bytes(await d.region_read(0, off, size), "little")


async def wr(d: Device, off: int, size: int, value: int) -> None:
    await d.region_write(0, off, value.to_bytes(size, "little"))


async def test_reads_of_every_size_and_alignment() -> None:
    d = Regs()
    assert await rd(d, 0, 4) == 0x11223344
    assert await rd(d, 0, 1) == 0x44
    assert await rd(d, 1, 2) == 0x2233
    assert await rd(d, 3, 2) == 0xDD11  # straddles a and b
    assert await rd(d, 0, 8) == 0xAABBCCDD11223344


async def test_partial_writes_touch_only_their_bytes() -> None:
    d = Regs()
    await wr(d, 1, 1, 0x99)
    assert d.bar0["a"] == 0x11229944
    await wr(d, 0, 8, 0x0102030405060708)  # a is RW, b is RO
    assert d.bar0["a"] == 0x05060708 and d.bar0["b"] == 0xAABBCCDD
    await wr(d, 0x18, 8, 0xDEADBEEFCAFEF00D)
    assert await rd(d, 0x1C, 4) == 0xDEADBEEF


async def test_access_types() -> None:
    d = Regs()
    await wr(d, 0x8, 4, 0x0F)
    assert d.bar0["status"] == 0xF0
    await wr(d, 0xC, 4, 0x3)
    await wr(d, 0xC, 4, 0x4)
    assert d.bar0["set"] == 0x7
    await wr(d, 0x10, 4, 0x1234)
    assert d.bar0["secret"] == 0x1234 and await rd(d, 0x10, 4) == 0
    d.bar0["mixed"] = 0xFF0000AA
    await wr(d, 0x20, 4, 0x0F_1234_55)
    assert d.bar0["mixed"] == 0xF0_1234_AA


async def test_hooks_plain_and_async() -> None:
    d = Regs()
    await wr(d, 0, 2, 0xBEEF)
    assert d.writes == [0x1122BEEF]
    assert await rd(d, 0x30, 4) == 0x5105


async def test_unimplemented_space_reads_zero() -> None:
    d = Regs()
    assert await rd(d, 0x800, 4) == 0
    await wr(d, 0x800, 4, 0xFFFFFFFF)
    assert await rd(d, 0x800, 4) == 0


async def test_a_subclass_overrides_a_hook_by_method_name() -> None:
    class Louder(Regs):
        def wrote_a(self, value: int) -> None:
            self.writes.append(value * 2)

        async def read_slow(self) -> int:
            return 0x10AD

    d = Louder()
    await wr(d, 0, 4, 21)
    assert d.writes == [42]
    assert await rd(d, 0x30, 4) == 0x10AD
    assert Regs().bar0.registers.write_hooks["a"].__func__ is Regs.wrote_a  # the parent keeps its own
