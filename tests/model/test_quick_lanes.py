"""The quick lane (one whole register, no coroutines) answers exactly as the general path does.

The runtime serves a plain handler's whole-register access through
``Device.quick_read``/``quick_write`` and everything else through
``region_read``/``region_write``, which take an ``async`` hook's quick lane
themselves; a device must not be able to tell which one served it.  Two
identical devices take the same accesses, one through each path, and must
agree on every answer, every register value and every event.  Per-access
events are recorded only while someone wants them.
"""

from __future__ import annotations

import random

import pytest
import trio

from vdev import RO, RW, RW1C, W1S, WO, AccessSizes, Bar, Device, Field, Register
from vdev.model.events import CommandChange, ConfigWrite, RegionRead, RegionWrite
from vdev.model.faults import DeviceFault, DeviceFaultPlan
from vdev.runtime.context import complete_now

BAR = 0
ACCESSES = 2000


class Mixed(Device):
    vendor_id = 0x1B36
    device_id = 0x0F42
    bar0 = Bar(
        4096,
        registers=[
            Register("plain", 0x0, width=4, access=RW),
            Register("status", 0x4, width=4, access=RW1C, reset=0xFF),
            Register("set", 0x8, width=4, access=W1S),
            Register("secret", 0xC, width=4, access=WO),
            Register("mixed", 0x10, width=4, access=RW, fields=(Field("low", 0, 8, RO), Field("top", 24, 8, RW1C))),
            Register("ticks", 0x18, width=8, access=RO),
            Register("doorbell", 0x20, width=2, access=RW),
        ],
    )

    def __init__(self) -> None:
        super().__init__()
        self.rung: list[int] = []

    @bar0.on_read("ticks")
    def tick(self) -> int:
        return self.bar0["ticks"] + 3

    @bar0.on_write("doorbell")
    def ring(self, value: int) -> None:
        self.rung.append(value)
        self.bar0["plain"] = value


class Policed(Device):
    """Registers with access-size policies: refused accesses must look the same on both paths."""

    vendor_id = 0x1B36
    device_id = 0x0F44
    bar0 = Bar(
        4096,
        sizes=AccessSizes(reads=(2, 4, 8), writes=(2, 4, 8), fill=0x00),
        registers=[
            Register("word", 0x0, width=4, access=RW, sizes=AccessSizes(reads=(4,), writes=(4,))),
            Register("kick", 0x4, width=4, access=WO, sizes=AccessSizes(reads=(), writes=(4,))),
            Register("wide", 0x8, width=8, access=RW, sizes=AccessSizes(reads=(4, 8), writes=(4, 8), zero_extend=True)),
            Register("free", 0x10, width=4, access=RW),
            Register("byte", 0x14, width=1, access=RW),
        ],
    )

    def __init__(self) -> None:
        super().__init__()
        self.rung: list[int] = []

    @bar0.on_write("kick")
    def ring(self, value: int) -> None:
        self.rung.append(value)
        self.bar0["free"] = value


class Awaiting(Device):
    vendor_id = 0x1B36
    device_id = 0x0F43
    bar0 = Bar(4096, registers=[Register("slow", 0x0, width=4, access=RW)])

    @bar0.on_read("slow")
    async def slow(self) -> int:
        await trio.lowlevel.checkpoint()
        return 7


class AsyncHooks(Device):
    """Some of Mixed's registers, with ``async`` hooks, one of which really waits."""

    vendor_id = 0x1B36
    device_id = 0x0F45
    bar0 = Bar(4096, registers=[r for r in Mixed.bar0.registers if r.name in {"plain", "status", "ticks", "doorbell"}])

    def __init__(self) -> None:
        super().__init__()
        self.rung: list[int] = []

    @bar0.on_read("ticks")
    async def tick(self) -> int:
        await trio.lowlevel.checkpoint()
        return self.bar0["ticks"] + 3

    @bar0.on_write("doorbell")
    async def ring(self, value: int) -> None:
        self.rung.append(value)
        self.bar0["plain"] = value


def accesses(seed: int, kind: type[Device] = Mixed) -> list[tuple[int, int, int]]:
    """(offset, size, value or -1 for a read): whole registers, and some that are not."""
    rng = random.Random(seed)
    whole = [(r.offset, r.width) for r in kind.bar0.registers]  # type: ignore[attr-defined]
    chosen = []
    for _ in range(ACCESSES):
        offset, size = rng.choice(whole) if rng.random() < 0.8 else (rng.randrange(0, 0x30), rng.choice((1, 2, 4, 8)))
        chosen.append((offset, size, rng.getrandbits(8 * size) if rng.random() < 0.5 else -1))
    return chosen


def enabled(device: Device) -> Device:
    complete_now(device.region_write(7, 0x04, (0x2).to_bytes(2, "little")))
    device.events.keep_accesses = True
    return device


def quick(device: Device, offset: int, size: int, value: int) -> bytes | None:
    """An access the way the runtime serves a plain handler: the lane if it takes it, else the general path."""
    if value < 0:
        answer = device.quick_read(BAR, offset, size)
        if answer is None:
            return complete_now(device.region_read(BAR, offset, size))
        return answer.to_bytes(size, "little")
    if not device.quick_write(BAR, offset, size, value):
        complete_now(device.region_write(BAR, offset, value.to_bytes(size, "little")))
    return None


async def general(device: Device, offset: int, size: int, value: int) -> bytes | None:
    if value < 0:
        return await device.region_read(BAR, offset, size)
    await device.region_write(BAR, offset, value.to_bytes(size, "little"))
    return None


@pytest.mark.parametrize("kind", [Mixed, Policed])
async def test_the_quick_lane_and_the_general_path_agree(kind: type[Mixed | Policed]) -> None:
    lane, reference = enabled(kind()), enabled(kind())
    for offset, size, value in accesses(seed=20, kind=kind):
        assert quick(lane, offset, size, value) == await general(reference, offset, size, value)
    assert lane.bar(BAR).registers.values == reference.bar(BAR).registers.values
    assert lane.rung == reference.rung
    assert list(lane.events) == list(reference.events)  # times aside, events compare by kind and fields
    assert lane.command_control.accesses == reference.command_control.accesses


async def test_an_async_hooks_lane_and_the_general_path_agree() -> None:
    lane, reference = enabled(AsyncHooks()), enabled(AsyncHooks())
    # A fault plan about reads and writes (of a place never accessed) closes every lane of the reference.
    elsewhere = {"region": BAR, "offset": 0x400}
    reference.faults = DeviceFaultPlan(
        [DeviceFault(on="read", action="corrupt", **elsewhere), DeviceFault(on="write", action="drop", **elsewhere)]
    )
    assert lane._quick_reads[BAR, 0x18, 8].is_async and lane._quick_writes[BAR, 0x20, 2].is_async
    for offset, size, value in accesses(seed=21, kind=AsyncHooks):
        assert await general(lane, offset, size, value) == await general(reference, offset, size, value)
    assert lane.bar(BAR).registers.values == reference.bar(BAR).registers.values
    assert lane.rung == reference.rung and lane.rung
    assert list(lane.events) == list(reference.events)
    assert lane.command_control.accesses == reference.command_control.accesses


def test_the_lane_steps_aside_for_what_only_the_general_path_does() -> None:
    assert enabled(Awaiting()).quick_read(BAR, 0x0, 4) is None  # an async hook
    device = enabled(Mixed())
    assert device.quick_read(BAR, 0x0, 2) is None  # part of a register
    device.faults = DeviceFaultPlan([DeviceFault(on="read", action="corrupt", region=BAR, offset=0x40)])
    assert device.quick_read(BAR, 0x0, 4) is None  # a fault plan about reads
    assert device.quick_write(BAR, 0x0, 4, 0)  # ... not about writes
    device.faults = DeviceFaultPlan()
    device.command_control.toggle_after_accesses(5)
    assert device.quick_read(BAR, 0x0, 4) is None  # accesses are being counted towards a toggle


def test_an_access_a_size_policy_refuses_has_no_lane() -> None:
    device = enabled(Policed())
    assert device.quick_read(BAR, 0x4, 4) is None  # the register refuses reads
    assert device.quick_write(BAR, 0x4, 4, 0)  # ... and takes writes
    assert device.quick_read(BAR, 0x14, 1) is None  # the BAR refuses 1-byte accesses
    assert not device.quick_write(BAR, 0x14, 1, 1)
    assert device.quick_read(BAR, 0x8, 8) is not None
    device.command_control.toggle_after_accesses(0)
    complete_now(device.region_write(7, 0x04, bytes(2)))
    assert device.quick_read(BAR, 0x0, 4) is None  # memory decoding is off


def test_access_events_are_built_only_while_someone_wants_them() -> None:
    device = Mixed()
    complete_now(device.region_write(7, 0x04, (0x2).to_bytes(2, "little")))
    quick(device, 0x0, 4, 5)
    complete_now(device.region_read(BAR, 0x4, 2))
    assert not device.events.of_kind(RegionRead, RegionWrite)
    assert device.events.of_kind(ConfigWrite, CommandChange)  # other events are always kept
    seen = []
    unsubscribe = device.events.subscribe(seen.append)
    quick(device, 0x0, 4, -1)
    unsubscribe()
    quick(device, 0x0, 4, -1)
    assert seen == [RegionRead(region=BAR, offset=0, size=4, value=5)]
    device.events.keep_accesses = True
    quick(device, 0x0, 4, 6)
    assert [e.value for e in device.events.of_kind(RegionRead, RegionWrite)] == [5, 6]
