"""edu's access-size rules and frozen registers on the in-process bench, no QEMU needed.

The expected answers are what ``test_edu_differential.py`` shows QEMU's own
edu gives for the same accesses; here they run in every environment, and
they are the rules edu now declares (``AccessSizes``) rather than codes.
"""

from __future__ import annotations

import trio

from vdev import ResetKind
from vdev.protocol.constants import IrqIndex
from vdev.testing import OpenBench
from vdev_devices.edu import Edu

ALL_ONES_32, ALL_ONES_64 = 0xFFFF_FFFF, (1 << 64) - 1


async def test_access_sizes_follow_edus_rules(vdev_bench: OpenBench) -> None:
    bench = await vdev_bench(Edu())
    await bench.enable(memory=True, io=False, master=False)
    await bench.write(0, 0x04, 0x12345678)
    assert await bench.read(0, 0x04) == ~0x12345678 & ALL_ONES_32  # liveness: the inverse
    assert await bench.read(0, 0x00, size=2) == 0  # narrower than 4 bytes: the BAR refuses, reads 0
    assert await bench.read(0, 0x04, size=1) == 0
    assert await bench.read(0, 0x00, size=8) == ALL_ONES_64  # 8 bytes below 0x80: all-ones
    assert await bench.read(0, 0x10) == ALL_ONES_32  # no register there
    assert await bench.read(0, 0x60) == ALL_ONES_32  # irq_raise is write-only: reads all-ones
    await bench.write(0, 0x04, 0, size=2)  # wrong size: ignored
    assert await bench.read(0, 0x04) == ~0x12345678 & ALL_ONES_32
    await bench.write(0, 0x80, 0x1_2345_6789, size=8)
    assert await bench.read(0, 0x80, size=8) == 0x1_2345_6789
    await bench.write(0, 0x80, 0xABCD)  # a 4-byte write replaces the whole 64-bit register
    assert await bench.read(0, 0x80, size=8) == 0xABCD
    await bench.write(0, 0x84, 5)  # inside dma_src, not at its offset: ignored
    assert await bench.read(0, 0x80, size=8) == 0xABCD
    assert await bench.read(0, 0x84) == ALL_ONES_32


async def test_a_running_transfer_freezes_its_registers_and_a_reset_keeps_state(
    vdev_bench: OpenBench, autojump_clock: object
) -> None:
    bench = await vdev_bench(Edu())
    await bench.enable(memory=True, io=False, master=True)
    await bench.dma_map(0x10_0000, 0x1000)
    for offset, value in ((0x80, 0x40000), (0x88, 0x10_0000), (0x90, 16)):
        await bench.write(0, offset, value, size=8)
    await bench.write(0, 0x98, 0x1 | 0x2 | 0x4, size=8)  # start: to RAM, interrupt when done
    await bench.write(0, 0x80, 0xDEAD, size=8)  # frozen while it runs
    await bench.write(0, 0x98, 0x0, size=8)  # a command without the start bit changes nothing
    assert await bench.read(0, 0x80, size=8) == 0x40000
    assert await bench.read(0, 0x98, size=8) == 0x7
    with trio.fail_after(5):
        await bench.irqs.wait(IrqIndex.INTX)
    assert await bench.read(0, 0x98, size=8) == 0x6
    await bench.write(0, 0x80, 0xBEEF, size=8)  # idle again: writable
    await bench.reset(ResetKind.DEVICE)
    await bench.enable(memory=True, io=False, master=True)
    assert await bench.read(0, 0x80, size=8) == 0xBEEF  # QEMU's edu has no reset handler
    assert await bench.read(0, 0x24) == 0x100  # irq_status too
