"""``ioat`` driven from vdev's vfio-user client the way the kernel's vfio selftests drive a CBDMA channel.

The client plays the selftests' ioat driver (``lib/drivers/ioat/ioat.c``):
reset the channel and wait for the reset bit to clear, point CHAINADDR at
one 64-byte copy descriptor whose ``next`` is itself, write DMACOUNT, poll
CHANSTS until DONE (or HALTED), then suspend.  Client memory is a memfd the
server maps, or private memory reached by DMA_READ/DMA_WRITE messages when a
test needs to see every access the engine made.
"""

from __future__ import annotations

import struct
from collections.abc import Awaitable, Callable

import pytest
import trio

from vdev import Device
from vdev.client import Client, DmaRegion
from vdev.model.events import FaultInjected
from vdev.model.faults import DeviceFault, DeviceFaultPlan
from vdev.protocol.constants import IrqIndex
from vdev_devices.ioat import Ioat

Connect = Callable[[Device], Awaitable[Client]]

CONFIG = 7
CHANNEL = 0x80
CHANCTRL, CHANCMD, DMACOUNT, CHANSTS = CHANNEL + 0x00, CHANNEL + 0x04, CHANNEL + 0x06, CHANNEL + 0x08
CHAINADDR, CHANCMP, CHANERR = CHANNEL + 0x10, CHANNEL + 0x18, CHANNEL + 0x28
ACTIVE, DONE, SUSPENDED, HALTED = 0, 1, 2, 3
INT_REARM, ERR_INT_EN, ANY_ERR_ABORT_EN = 0x1, 0x10, 0x8
RESET, SUSPEND = 0x20, 0x04
INT_EN, COMPL_WRITE = 0x1, 0x8
SRC_ADDR_ERR, DEST_ADDR_ERR, NEXT_ADDR_ERR, CONTROL_ERR, LENGTH_ERR = 0x1, 0x2, 0x4, 0x400, 0x800
DMAUNCERRSTS, CHANERR_INT = 0x148, 0x180
MSIX_TABLE = 0x2000

IOVA = 0x10_0000
DESC, SRC, DST, COMPLETION = 0x0, 0x1000, 0x2000, 0x3000  # offsets in the mapped window
UNMAPPED = 0x4000_0000


class Driver:
    """The selftests' ioat driver steps, over the client."""

    def __init__(self, client: Client, memory: DmaRegion | None = None) -> None:
        self.client = client
        self._memory = memory

    @property
    def memory(self) -> DmaRegion:
        assert self._memory is not None, "this test mapped no DMA memory"
        return self._memory

    async def read(self, offset: int, size: int) -> int:
        return int.from_bytes(await self.client.region_read(0, offset, size), "little")

    async def write(self, offset: int, value: int, size: int) -> None:
        await self.client.region_write(0, offset, value.to_bytes(size, "little"))

    async def status(self) -> int:
        return await self.read(CHANSTS, 8)

    async def wait_state(self, *states: int) -> int:
        with trio.fail_after(10):
            while True:
                status = await self.status()
                if status & 0x7 in states:
                    return status

    async def init(self) -> None:
        await self.client.region_write(CONFIG, 0x04, (0x0406).to_bytes(2, "little"))  # MEM, MASTER, INTx off
        await self.reset()
        await self.write(0x03, 0x08, 1)  # INTRCTRL: MSI-X vector control

    async def reset(self) -> None:
        await self.write(CHANCMD, RESET, 1)
        with trio.fail_after(10):
            while await self.read(CHANCMD, 1) & RESET:
                pass
        assert await self.status() & 0x7 == HALTED

    async def start(
        self, src: int, dst: int, size: int, count: int, *, ctl: int = 0, chanctrl: int = INT_REARM | ANY_ERR_ABORT_EN
    ) -> None:
        descriptor = self.memory.iova + DESC
        self.memory.write(DESC, struct.pack("<IIQQQ32x", size, ctl, src, dst, descriptor))
        await self.write(CHAINADDR, descriptor, 8)
        await self.write(CHANCTRL, chanctrl, 2)
        await self.write(DMACOUNT, count, 2)

    async def memcpy(self, src: int, dst: int, size: int, count: int = 1, **options: int) -> int:
        """Run ``count`` copies; suspend after DONE as the driver does.  Returns the final CHANSTS state."""
        await self.start(src, dst, size, count, **options)
        status = await self.wait_state(DONE, HALTED)
        if status & 0x7 == DONE:
            await self.write(CHANCMD, SUSPEND, 1)
            return await self.wait_state(SUSPENDED) & 0x7
        return HALTED


async def setup(
    connect: Connect, device: Ioat | None = None, *, private: bool = False, msix: bool = False
) -> tuple[Ioat, Driver, object]:
    device = device or Ioat()
    client = await connect(device)
    if private:
        memory = await client.dma_map_private(IOVA, 0x4000)
    else:
        memory = await client.dma_map_memfd(IOVA, 0x4000)
    driver = Driver(client, memory)
    await driver.init()
    interrupt = None
    if msix:
        (interrupt,) = await client.set_irqs(IrqIndex.MSIX, 0, 1)
        msix_cap = await find_capability(client, 0x11)
        await client.region_write(CONFIG, msix_cap + 2, (0x8000).to_bytes(2, "little"))  # MSI-X enable
        await driver.write(MSIX_TABLE + 12, 0, 4)  # vector 0 unmasked
    return device, driver, interrupt


async def find_capability(client: Client, cap_id: int) -> int:
    offset = (await client.region_read(CONFIG, 0x34, 1))[0]
    while offset:
        header = await client.region_read(CONFIG, offset, 2)
        if header[0] == cap_id:
            return offset
        offset = header[1]
    raise AssertionError(f"no capability {cap_id:#x}")


async def test_identity_global_registers_and_reset_state(vdev_client: Connect) -> None:
    client = await vdev_client(Ioat(version="0x32"))
    ids = int.from_bytes(await client.region_read(CONFIG, 0x00, 4), "little")
    assert ids == 0x2021_8086
    driver = Driver(client)
    await client.region_write(CONFIG, 0x04, (0x0002).to_bytes(2, "little"))
    assert await driver.read(0x00, 1) == 1  # CHANCNT
    assert 1 << await driver.read(0x01, 1) == 4096  # XFERCAP
    assert await driver.read(0x08, 1) == 0x32  # CBVER
    assert await driver.status() == HALTED
    await driver.write(CHAINADDR, 0x1234_5640, 8)
    assert await driver.read(CHAINADDR, 8) == 0x1234_5640
    await driver.reset()
    assert await driver.read(CHAINADDR, 8) == 0


async def test_extended_config_error_registers_are_write_one_to_clear(vdev_client: Connect) -> None:
    device = Ioat()
    client = await vdev_client(device)
    device.config.write_int(CHANERR_INT, 4, 0x0000_0101)
    device.config.write_int(DMAUNCERRSTS, 4, 0x0000_0030)
    await client.region_write(CONFIG, CHANERR_INT, (0x0000_0001).to_bytes(4, "little"))
    await client.region_write(CONFIG, DMAUNCERRSTS, (0xFFFF_FFFF).to_bytes(4, "little"))
    assert int.from_bytes(await client.region_read(CONFIG, CHANERR_INT, 4), "little") == 0x100
    assert int.from_bytes(await client.region_read(CONFIG, DMAUNCERRSTS, 4), "little") == 0


async def test_memcpy_copies_and_chansts_names_the_completed_descriptor(vdev_client: Connect) -> None:
    _, driver, _ = await setup(vdev_client)
    driver.memory.write(SRC, bytes(range(256)) * 16)
    driver.memory.write(DST, b"y" * 4096)
    assert await driver.memcpy(IOVA + SRC, IOVA + DST, 4096) == SUSPENDED
    assert driver.memory.read(DST, 4096) == bytes(range(256)) * 16
    assert await driver.status() == IOVA + DESC | SUSPENDED
    assert await driver.read(CHANERR, 4) == 0


async def test_dmacount_runs_the_self_pointing_descriptor_that_many_times(vdev_client: Connect) -> None:
    device, driver, _ = await setup(vdev_client, private=True)
    driver.memory.write(SRC, b"x" * 64)
    driver.memory.accesses.clear()
    await driver.start(IOVA + SRC, IOVA + DST, 64, 5)
    # No register polling while the engine's DMA messages are out: libvfio-user
    # would take the client's next request for the reply it waits for.
    with trio.fail_after(10):
        await driver.memory.wait_accesses(15)
    assert await driver.wait_state(DONE) == IOVA + DESC | DONE
    accesses = [(a.kind, a.offset, a.size) for a in driver.memory.accesses]
    one_copy = [("read", DESC, 64), ("read", SRC, 64), ("write", DST, 64)]
    assert accesses == one_copy * 5
    assert driver.memory.read(DST, 64) == b"x" * 64
    assert device.processed == 5


async def test_a_copy_across_two_adjacent_mappings(vdev_client: Connect) -> None:
    client = await vdev_client(Ioat(xfercap="13"))
    memory = await client.dma_map_memfd(IOVA, 0x4000)
    upper = await client.dma_map_memfd(IOVA + 0x4000, 0x4000)
    driver = Driver(client, memory)
    await driver.init()
    memory.write(0x3000, b"a" * 0x1000)
    upper.write(0, b"b" * 0x1000)
    assert await driver.memcpy(IOVA + 0x3000, IOVA + 0x6000, 0x2000) == SUSPENDED  # the source crosses the edge
    assert upper.read(0x2000, 0x2000) == b"a" * 0x1000 + b"b" * 0x1000
    assert await driver.memcpy(IOVA + 0x6000, IOVA + 0x3800, 0x2000) == SUSPENDED  # the destination does
    assert memory.read(0x3800, 0x800) + upper.read(0, 0x1800) == b"a" * 0x1000 + b"b" * 0x1000


async def test_completion_write_puts_chansts_at_chancmp(vdev_client: Connect) -> None:
    _, driver, _ = await setup(vdev_client)
    await driver.write(CHANCMP, IOVA + COMPLETION, 8)
    await driver.start(IOVA + SRC, IOVA + DST, 8, 3, ctl=COMPL_WRITE)
    await driver.wait_state(DONE)
    assert int.from_bytes(driver.memory.read(COMPLETION, 8), "little") == IOVA + DESC | DONE


async def test_only_descriptors_asking_for_it_interrupt_and_only_while_rearmed(vdev_client: Connect) -> None:
    _, driver, interrupt = await setup(vdev_client, msix=True)
    assert interrupt is not None
    assert await driver.memcpy(IOVA + SRC, IOVA + DST, 8) == SUSPENDED  # no interrupt asked for
    assert await driver.memcpy(IOVA + SRC, IOVA + DST, 8, ctl=INT_EN) == SUSPENDED
    with trio.fail_after(10):
        assert await interrupt.wait() == 1  # one signal: the first copy raised none
    assert not await driver.read(CHANCTRL, 2) & INT_REARM  # the interrupt disarmed the channel
    assert await driver.read(0x04, 4) == 1  # ATTNSTATUS names the channel, and reading clears it
    assert await driver.read(0x04, 4) == 0
    assert await driver.memcpy(IOVA + SRC, IOVA + DST, 8, ctl=INT_EN, chanctrl=ANY_ERR_ABORT_EN) == SUSPENDED
    assert await driver.memcpy(IOVA + SRC, IOVA + DST, 8, ctl=INT_EN) == SUSPENDED
    with trio.fail_after(10):
        assert await interrupt.wait() == 1  # the unarmed one did not interrupt


async def test_a_copy_to_an_unmapped_iova_halts_with_chanerr_until_reset(vdev_client: Connect) -> None:
    device, driver, interrupt = await setup(vdev_client, msix=True)
    assert interrupt is not None
    driver.memory.write(DST, b"y" * 64)
    assert await driver.memcpy(IOVA + SRC, UNMAPPED, 64, ctl=INT_EN) == HALTED
    assert await driver.read(CHANERR, 4) == DEST_ADDR_ERR
    assert await driver.status() == HALTED  # no descriptor completed
    await driver.write(DMACOUNT, 2, 2)  # ignored while halted by an error
    assert device.processed == 0 and await driver.status() == HALTED
    await driver.write(CHANERR, DEST_ADDR_ERR, 4)  # write back to clear, as the driver does
    await driver.reset()
    assert await driver.memcpy(UNMAPPED, IOVA + DST, 64) == HALTED
    assert await driver.read(CHANERR, 4) == SRC_ADDR_ERR
    assert driver.memory.read(DST, 64) == b"y" * 64
    await driver.write(CHANERR, SRC_ADDR_ERR, 4)
    await driver.reset()
    assert await driver.memcpy(IOVA + SRC, IOVA + DST, 64, ctl=INT_EN) == SUSPENDED
    with trio.fail_after(10):
        assert await interrupt.wait() == 1  # the halted copies raised nothing (no error interrupts asked for)


async def test_error_interrupt_when_chanctrl_asks(vdev_client: Connect) -> None:
    _, driver, interrupt = await setup(vdev_client, msix=True)
    assert interrupt is not None
    chanctrl = INT_REARM | ERR_INT_EN | ANY_ERR_ABORT_EN
    assert await driver.memcpy(IOVA + SRC, UNMAPPED, 64, chanctrl=chanctrl) == HALTED
    with trio.fail_after(10):
        assert await interrupt.wait() == 1


@pytest.mark.parametrize(
    ("ctl", "size", "error"),
    [(0x0100_0000, 64, CONTROL_ERR), (0, 0, LENGTH_ERR), (0, 8192, LENGTH_ERR)],
    ids=["unknown-operation", "empty-copy", "beyond-xfercap"],
)
async def test_bad_descriptors_halt_with_their_error(vdev_client: Connect, ctl: int, size: int, error: int) -> None:
    _, driver, _ = await setup(vdev_client)
    assert await driver.memcpy(IOVA + SRC, IOVA + DST, size, ctl=ctl) == HALTED
    assert await driver.read(CHANERR, 4) == error


async def test_an_injected_dma_fault_halts_the_channel(vdev_client: Connect) -> None:
    device = Ioat()
    device.faults = DeviceFaultPlan([DeviceFault(on="dma", action="fail", count=1)])
    _, driver, _ = await setup(vdev_client, device)
    assert await driver.memcpy(IOVA + SRC, IOVA + DST, 64) == HALTED
    assert await driver.read(CHANERR, 4) == NEXT_ADDR_ERR  # the descriptor fetch was refused
    await driver.write(CHANERR, NEXT_ADDR_ERR, 4)
    await driver.reset()
    assert await driver.memcpy(IOVA + SRC, IOVA + DST, 64) == SUSPENDED
    assert [e.fault.action for e in device.events.of_kind(FaultInjected)] == ["fail"]


async def test_reset_stops_a_long_run_and_device_reset_halts_the_channel(vdev_client: Connect) -> None:
    device, driver, _ = await setup(vdev_client)
    await driver.start(IOVA + SRC, IOVA + DST, 4096, 0xFFFF)
    assert await driver.status() & 0x7 == ACTIVE
    await driver.reset()
    assert device.processed == 0 and await driver.read(DMACOUNT, 2) == 0
    assert await driver.memcpy(IOVA + SRC, IOVA + DST, 64) == SUSPENDED
    await driver.client.device_reset()
    await driver.client.region_write(CONFIG, 0x04, (0x0006).to_bytes(2, "little"))  # the reset cleared COMMAND
    assert await driver.status() == HALTED
    assert await driver.read(CHAINADDR, 8) == 0
