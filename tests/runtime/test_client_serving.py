"""A served device driven by vdev's own vfio-user client: DMA both ways, interrupts, quiesce.

No QEMU here: the client plays the VMM, so DMA can be offered as a shared
memfd or as private memory served through DMA_READ/DMA_WRITE messages.
"""

from __future__ import annotations

import struct
from collections.abc import Awaitable, Callable

import pytest
import trio

from vdev import WO, Bar, Device, DmaError, MsiX, Register
from vdev.client import Client, Interrupt
from vdev.protocol.constants import IrqIndex, IrqSetFlag
from vdev.runtime import DeviceContext
from vdev_devices.edu import Edu

pytestmark = pytest.mark.requires("libvfio-user")

CONFIG = 7
Connect = Callable[[Device], Awaitable[Client]]


async def config_write(client: Client, offset: int, value: int, size: int) -> None:
    await client.region_write(CONFIG, offset, value.to_bytes(size, "little"))


async def config_read(client: Client, offset: int, size: int) -> int:
    return int.from_bytes(await client.region_read(CONFIG, offset, size), "little")


async def edu_dma(client: Client, intx: Interrupt, source: int, destination: int, count: int, to_ram: bool) -> None:
    """Run one edu DMA transfer and wait for its completion interrupt.

    Waiting for the interrupt rather than polling matters: libvfio-user reads
    the reply to its DMA_READ/DMA_WRITE from the same socket, so a client
    request sent while a message-based transfer is in flight would be taken
    for that reply.
    """
    command = 0x1 | 0x4 | (0x2 if to_ram else 0)
    for offset, value in ((0x80, source), (0x88, destination), (0x90, count), (0x98, command)):
        await client.region_write(0, offset, value.to_bytes(8, "little"))
    with trio.fail_after(10):
        await intx.wait()
    assert int.from_bytes(await client.region_read(0, 0x24, 4), "little") == 0x100
    await client.region_write(0, 0x64, (0x100).to_bytes(4, "little"))


@pytest.mark.parametrize("kind", ["memfd", "private"])
async def test_dma_both_ways(vdev_client: Connect, kind: str) -> None:
    device = Edu(dma_delay=0)
    client = await vdev_client(device)
    await config_write(client, 0x04, 0x6, 2)  # MEM | MASTER
    (intx,) = await client.set_irqs(IrqIndex.INTX, 0, 1)
    iova = 0x10_0000
    region = await (client.dma_map_memfd if kind == "memfd" else client.dma_map_private)(iova, 0x4000)
    pattern = bytes(range(200))
    region.write(0x100, pattern)
    await edu_dma(client, intx, iova + 0x100, 0x40000, len(pattern), to_ram=False)
    assert bytes(device.dma_buffer[: len(pattern)]) == pattern
    await edu_dma(client, intx, 0x40000, iova + 0x2000, len(pattern), to_ram=True)
    assert region.read(0x2000, len(pattern)) == pattern
    mapped = [e.data["mapped"] for e in device.events.of_kind("dma_map")]
    assert mapped == [kind == "memfd"]
    if kind == "private":
        assert [(a.kind, a.offset, a.size) for a in region.accesses] == [("read", 0x100, 200), ("write", 0x2000, 200)]
    else:
        assert region.accesses == []
    await client.dma_unmap(region)
    assert device.events.of_kind("dma_unmap")


async def test_dma_without_bus_mastering_is_refused(vdev_client: Connect) -> None:
    device = Edu(dma_delay=0)
    client = await vdev_client(device)
    await config_write(client, 0x04, 0x2, 2)  # MEM only
    (intx,) = await client.set_irqs(IrqIndex.INTX, 0, 1)
    region = await client.dma_map_memfd(0x10_0000, 0x1000)
    region.write(0, b"secret")
    with pytest.raises(DmaError, match="bus mastering is disabled"):
        await device.dma.read(0x10_0000, 6)
    await edu_dma(client, intx, 0x10_0000, 0x40000, 6, to_ram=False)
    assert bytes(device.dma_buffer[:6]) == bytes(6)
    violations = [e.data for e in device.events.of_kind("violation") if e.data["what"] == "dma"]
    assert len(violations) == 2 and violations[0]["address"] == 0x10_0000


async def test_dma_outside_mapped_memory_is_refused(vdev_client: Connect) -> None:
    device = Edu(dma_delay=0)
    client = await vdev_client(device)
    await config_write(client, 0x04, 0x6, 2)
    await client.dma_map_memfd(0x10_0000, 0x1000)
    with pytest.raises(DmaError, match="not inside memory the client mapped"):
        await device.dma.write(0x10_0F00, bytes(0x200))


async def test_msi_and_intx_reach_the_client(vdev_client: Connect) -> None:
    device = Edu()
    client = await vdev_client(device)
    await config_write(client, 0x04, 0x6, 2)
    (intx,) = await client.set_irqs(IrqIndex.INTX, 0, 1)
    await client.region_write(0, 0x60, (0x8).to_bytes(4, "little"))  # raise
    with trio.fail_after(5):
        await intx.wait()
    assert device.irq.intx_level and await config_read(client, 0x06, 2) & 0x8
    await client.region_write(0, 0x64, (0x8).to_bytes(4, "little"))  # acknowledge
    assert not device.irq.intx_level and not await config_read(client, 0x06, 2) & 0x8

    msi_at = 0x40
    assert await config_read(client, msi_at, 1) == 0x05
    control = await config_read(client, msi_at + 2, 2)
    await config_write(client, msi_at + 2, control | 0x1, 2)
    (msi,) = await client.set_irqs(IrqIndex.MSI, 0, 1)
    await client.region_write(0, 0x60, (0x2).to_bytes(4, "little"))
    with trio.fail_after(5):
        assert await msi.wait() >= 1
    assert device.irq.mode == "msi"


class Ringer(Device):
    """Two MSI-X vectors, table at BAR0+0x800, PBA at BAR0+0xc00; the doorbell signals vector ``n``."""

    vendor_id = 0x1B36
    device_id = 0x5158
    bar0 = Bar(4096, registers=[Register("doorbell", 0x0, access=WO)])

    def capabilities(self) -> list[MsiX]:
        return [MsiX(vectors=2, table_bar=0, table_offset=0x800, pba_bar=0, pba_offset=0xC00)]

    @bar0.on_write("doorbell")
    def ring(self, value: int) -> None:
        self.irq.trigger(value)


async def test_msix_masking_is_the_clients_set_irqs_and_eventfds_not_the_table(vdev_client: Connect) -> None:
    device = Ringer()
    client = await vdev_client(device)
    await config_write(client, 0x04, 0x6, 2)
    msix_at = 0x40
    assert await config_read(client, msix_at, 1) == 0x11
    await config_write(client, msix_at + 2, 0x8000, 2)  # enable, no function mask

    async def ring(vector: int) -> None:
        await client.region_write(0, 0x0, vector.to_bytes(4, "little"))

    async def pba() -> int:
        return int.from_bytes(await client.region_read(0, 0xC00, 8), "little")

    await ring(0)  # no eventfd yet: held
    assert await pba() == 0b01
    first, second = await client.set_irqs(IrqIndex.MSIX, 0, 2)
    with trio.fail_after(5):  # installing the eventfd delivers it (just after SET_IRQS is answered)
        assert await first.wait() == 1
    assert await pba() == 0
    table_entry_1 = 0x800 + 16
    assert await client.region_read(0, table_entry_1 + 12, 4) == (1).to_bytes(4, "little")  # reset: masked
    await ring(1)  # the table's mask bit is the client's business: it does not gate
    assert second.pending() == 1
    await client.signal_irqs(IrqIndex.MSIX, 1, 1, action=IrqSetFlag.ACTION_MASK)
    await ring(1)
    assert second.pending() == 0 and await pba() == 0b10
    await client.signal_irqs(IrqIndex.MSIX, 1, 1, action=IrqSetFlag.ACTION_UNMASK)
    assert second.pending() == 1 and await pba() == 0


class Quiescing(Device):
    """A device whose DMA engine needs a moment to stop."""

    vendor_id = 0x1B36
    device_id = 0x0F0E
    bar0 = Bar(4096, registers=[Register("r", 0)])

    async def on_quiesce(self) -> None:
        self.events.record("quiesce", done=False, note="draining")
        await trio.sleep(0.2)


async def test_dma_map_waits_for_an_async_quiesce(vdev_serve: Callable[[Device], Awaitable[DeviceContext]]) -> None:
    device = Quiescing()
    context = await vdev_serve(device)
    async with Client.connect(context.socket_path) as client:
        await config_write(client, 0x04, 0x2, 2)
        await client.dma_map_memfd(0x10_0000, 0x1000)
        kinds = [e.kind for e in device.events if e.kind in ("quiesce", "dma_map")]
        assert kinds[-1] == "dma_map" and "quiesce" in kinds
        quiesces = device.events.of_kind("quiesce")
        assert quiesces[-1].data["done"] is True and quiesces[-1].t <= device.events.of_kind("dma_map")[0].t
        assert await client.region_read(0, 0, 4) == bytes(4)


class Sleepy(Device):
    vendor_id = 0x1B36
    device_id = 0x5107
    bar0 = Bar(4096, registers=[Register("slow", 0)])

    @bar0.on_read("slow")
    async def read_slow(self) -> int:
        await trio.sleep(1)
        return 1


async def test_a_sleeping_handler_blocks_only_its_device(vdev_client: Connect) -> None:
    sleepy_client = await vdev_client(Sleepy())
    fast_client = await vdev_client(Edu())
    for client in (sleepy_client, fast_client):
        await config_write(client, 0x04, 0x2, 2)
    order: list[str] = []

    async def slow_read() -> None:
        await sleepy_client.region_read(0, 0, 4)
        order.append("slow")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(slow_read)
        await trio.sleep(0.05)
        for value in range(50):
            await fast_client.region_write(0, 0x04, struct.pack("<I", value))
            assert struct.unpack("<I", await fast_client.region_read(0, 0x04, 4))[0] == ~value & 0xFFFFFFFF
        order.append("fast")
    assert order == ["fast", "slow"]
