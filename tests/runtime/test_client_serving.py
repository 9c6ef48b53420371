"""A served device driven by vdev's own vfio-user client: DMA both ways, interrupts, quiesce.

No QEMU here: the client plays the VMM, so DMA can be offered as a shared
memfd or as private memory served through DMA_READ/DMA_WRITE messages.
"""

from __future__ import annotations

import errno
import logging
from pathlib import Path

import pytest
import trio

from vdev import RW, WO, AccessSizes, Bar, Device, DmaError, Msi, MsiX, Refusal, Register
from vdev.client import Client, Interrupt
from vdev.libvfio_user import Library
from vdev.model.events import DmaMap, DmaRefused, DmaUnmap, HandlerError, Irq, Quiesce, Reset
from vdev.protocol.constants import IrqIndex, IrqSetFlag
from vdev.testing import ConnectClient, ServeDevice, served
from vdev_devices.edu import Edu

pytestmark = pytest.mark.requires("libvfio-user")


async def edu_dma(client: Client, intx: Interrupt, source: int, destination: int, count: int, to_ram: bool) -> None:
    """Run one edu DMA transfer and wait for its completion interrupt.

    Waiting for the interrupt rather than polling matters: libvfio-user reads
    the reply to its DMA_READ/DMA_WRITE from the same socket, so a client
    request sent while a message-based transfer is in flight would be taken
    for that reply.
    """
    command = 0x1 | 0x4 | (0x2 if to_ram else 0)
    for offset, value in ((0x80, source), (0x88, destination), (0x90, count), (0x98, command)):
        await client.write64(0, offset, value)
    with trio.fail_after(10):
        await intx.wait()
    assert await client.read32(0, 0x24) == 0x100
    await client.write32(0, 0x64, 0x100)


@pytest.mark.parametrize("kind", ["memfd", "private"])
async def test_dma_both_ways(vdev_client: ConnectClient, kind: str) -> None:
    device = Edu(dma_delay=0)
    client = await vdev_client(device)
    await client.enable(memory=True, io=False, master=True)
    (intx,) = await client.set_irqs(IrqIndex.INTX, 0, 1)
    iova = 0x10_0000
    region = await (client.dma_map_memfd if kind == "memfd" else client.dma_map_private)(iova, 0x4000)
    pattern = bytes(range(200))
    region.write(0x100, pattern)
    await edu_dma(client, intx, iova + 0x100, 0x40000, len(pattern), to_ram=False)
    assert bytes(device.dma_buffer[: len(pattern)]) == pattern
    await edu_dma(client, intx, 0x40000, iova + 0x2000, len(pattern), to_ram=True)
    assert region.read(0x2000, len(pattern)) == pattern
    mapped = [e.mapped for e in device.events.of_kind(DmaMap)]
    assert mapped == [kind == "memfd"]
    if kind == "private":
        assert [(a.kind, a.offset, a.size) for a in region.accesses] == [("read", 0x100, 200), ("write", 0x2000, 200)]
    else:
        assert region.accesses == []
    await client.dma_unmap(region)
    assert device.events.of_kind(DmaUnmap)


async def test_dma_without_bus_mastering_is_refused(vdev_client: ConnectClient) -> None:
    device = Edu(dma_delay=0)
    client = await vdev_client(device)
    await client.enable(memory=True, io=False, master=False)
    (intx,) = await client.set_irqs(IrqIndex.INTX, 0, 1)
    region = await client.dma_map_memfd(0x10_0000, 0x1000)
    region.write(0, b"secret")
    with pytest.raises(DmaError, match="bus mastering is disabled"):
        await device.dma.read(0x10_0000, 6)
    await edu_dma(client, intx, 0x10_0000, 0x40000, 6, to_ram=False)
    assert bytes(device.dma_buffer[:6]) == bytes(6)
    violations = device.events.of_kind(DmaRefused)
    assert len(violations) == 2 and violations[0].address == 0x10_0000


async def test_dma_outside_mapped_memory_is_refused(vdev_client: ConnectClient) -> None:
    device = Edu(dma_delay=0)
    client = await vdev_client(device)
    await client.enable(memory=True, io=False, master=True)
    await client.dma_map_memfd(0x10_0000, 0x1000)
    with pytest.raises(DmaError, match="not inside memory the client mapped"):
        await device.dma.write(0x10_0F00, bytes(0x200))


async def test_msi_and_intx_reach_the_client(vdev_client: ConnectClient) -> None:
    device = Edu()
    client = await vdev_client(device)
    await client.enable(memory=True, io=False, master=True)
    (intx,) = await client.set_irqs(IrqIndex.INTX, 0, 1)
    await client.write32(0, 0x60, 0x8)  # raise
    with trio.fail_after(5):
        await intx.wait()
    assert device.irq.intx_level and await client.config_read(0x06, 2) & 0x8
    await client.write32(0, 0x64, 0x8)  # acknowledge
    assert not device.irq.intx_level and not await client.config_read(0x06, 2) & 0x8

    msi_at = 0x40
    assert await client.config_read(msi_at, 1) == 0x05
    control = await client.config_read(msi_at + 2, 2)
    await client.config_write(msi_at + 2, control | 0x1, 2)
    (msi,) = await client.set_irqs(IrqIndex.MSI, 0, 1)
    await client.write32(0, 0x60, 0x2)
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


async def test_msix_masking_is_the_clients_set_irqs_and_eventfds_not_the_table(vdev_client: ConnectClient) -> None:
    device = Ringer()
    client = await vdev_client(device)
    await client.enable(memory=True, io=False, master=True)
    msix_at = 0x40
    assert await client.config_read(msix_at, 1) == 0x11
    await client.config_write(msix_at + 2, 0x8000, 2)  # enable, no function mask

    async def ring(vector: int) -> None:
        await client.write32(0, 0x0, vector)

    async def pba() -> int:
        return await client.read64(0, 0xC00)

    await ring(0)  # no eventfd yet: held
    assert await pba() == 0b01
    first, second = await client.set_irqs(IrqIndex.MSIX, 0, 2)
    with trio.fail_after(5):  # installing the eventfd delivers it (just after SET_IRQS is answered)
        assert await first.wait() == 1
    assert await pba() == 0
    table_entry_1 = 0x800 + 16
    assert await client.read32(0, table_entry_1 + 12) == 1  # reset: masked
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
        self.events.record(Quiesce(done=False))
        await trio.sleep(0.2)


async def test_dma_map_waits_for_an_async_quiesce(vdev_serve: ServeDevice) -> None:
    device = Quiescing()
    context = await vdev_serve(device)
    async with Client.connect(context.socket_path) as client:
        await client.enable(memory=True, io=False, master=False)
        await client.dma_map_memfd(0x10_0000, 0x1000)
        kinds = [e.kind for e in device.events if e.kind in ("quiesce", "dma_map")]
        assert kinds[-1] == "dma_map" and "quiesce" in kinds
        quiesces = device.events.of_kind(Quiesce)
        assert quiesces[-1].done is True and quiesces[-1].t <= device.events.of_kind(DmaMap)[0].t
        assert await client.read32(0, 0) == 0


class Ringer2(Device):
    """INTx and two MSI vectors with per-vector masking; the doorbell raises INTx or signals an MSI vector."""

    vendor_id = 0x1B36
    device_id = 0x5159
    bar0 = Bar(4096, registers=[Register("doorbell", 0x0, access=WO), Register("lower", 0x4, access=WO)])

    def capabilities(self) -> list[Msi]:
        return [Msi(vectors=2, per_vector_mask=True)]

    @bar0.on_write("doorbell")
    def ring(self, value: int) -> None:
        self.irq.trigger(value)

    @bar0.on_write("lower")
    def lower(self, _value: int) -> None:
        self.irq.lower_intx()


async def test_set_irqs_mask_and_unmask_reach_the_model_for_intx_and_msi(vdev_client: ConnectClient) -> None:
    """libvfio-user hands SET_IRQS MASK/UNMASK to the device: a held interrupt fires on unmask."""
    device = Ringer2()
    client = await vdev_client(device)
    await client.enable(memory=True, io=False, master=True)
    (intx,) = await client.set_irqs(IrqIndex.INTX)
    await client.signal_irqs(IrqIndex.INTX, action=IrqSetFlag.ACTION_MASK)
    await client.write32(0, 0x0, 0)
    assert device.irq.intx_level and intx.pending() == 0
    await client.signal_irqs(IrqIndex.INTX, action=IrqSetFlag.ACTION_UNMASK)
    assert intx.pending() == 1  # the level is still high
    await client.write32(0, 0x4, 0)

    msi_at = 0x40
    await client.config_write(msi_at + 2, 0x1 | 1 << 4, 2)  # enable, two vectors
    msi = await client.set_irqs(IrqIndex.MSI, 0, 2)
    await client.signal_irqs(IrqIndex.MSI, 1, 1, action=IrqSetFlag.ACTION_MASK)
    await client.write32(0, 0x0, 1)
    assert msi[1].pending() == 0 and await client.config_read(msi_at + 20) == 0b10
    await client.signal_irqs(IrqIndex.MSI, 1, 1, action=IrqSetFlag.ACTION_UNMASK)
    assert msi[1].pending() == 1 and await client.config_read(msi_at + 20) == 0


class Sleepy(Device):
    """A read that waits, in its handler, until the test lets it finish."""

    vendor_id = 0x1B36
    device_id = 0x5107
    bar0 = Bar(4096, registers=[Register("slow", 0)])

    def __init__(self) -> None:
        super().__init__()
        self.entered = trio.Event()
        self.release = trio.Event()

    @bar0.on_read("slow")
    async def read_slow(self) -> int:
        self.entered.set()
        await self.release.wait()
        return 1


async def test_an_awaiting_handler_stalls_only_its_device(vdev_client: ConnectClient) -> None:
    """The slow device's handler is inside its await while the other device answers 50 round trips.

    Were the devices served one at a time, the fast accesses would wait for
    the slow read, which waits for them: the deadline turns that into a failure.
    """
    sleepy = Sleepy()
    sleepy_client = await vdev_client(sleepy)
    fast_client = await vdev_client(Edu())
    for client in (sleepy_client, fast_client):
        await client.enable(memory=True, io=False, master=False)
    order: list[str] = []

    async def slow_read() -> None:
        assert await sleepy_client.read32(0, 0) == 1
        order.append("slow")

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(slow_read)
            await sleepy.entered.wait()
            for value in range(50):
                await fast_client.write32(0, 0x04, value)
                assert await fast_client.read32(0, 0x04) == ~value & 0xFFFFFFFF
            order.append("fast")
            sleepy.release.set()
    assert order == ["fast", "slow"]


async def test_what_clients_routinely_do_is_not_logged_as_a_problem(
    vdev_client: ConnectClient, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 15: an unwired interrupt and an unmap of a range never mapped (QEMU does both) printed
    ``ERROR … no fd for interrupt 0`` and ``failed to remove DMA region … No such file or directory``."""
    from vdev.client import VfioUserError
    from vdev.protocol.messages import DmaUnmapRequest
    from vdev_devices.hello import Hello

    device = Hello()
    client = await vdev_client(device)
    await client.enable(memory=True, io=False, master=False)
    with caplog.at_level(logging.DEBUG, logger="vdev"):
        await client.write32(0, 0x0C, 1)  # doorbell: INTx, which the client never wired
        with pytest.raises(VfioUserError):
            await client.request(DmaUnmapRequest(address=0x10_0000, size=0x1000))
    assert device.events.of_kind(Irq)
    messages = {record.getMessage() for record in caplog.records}
    assert any("no fd for interrupt" in message for message in messages)  # still there, for -vv
    assert any("failed to remove DMA region" in message for message in messages)
    assert not [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]


async def test_a_server_that_never_had_a_client_stops_without_a_reset(vdev_socket_dir: Path) -> None:
    """Issue 15: stopping it recorded a spurious ``reset`` with reason ``lost_connection``."""
    from vdev_devices.hello import Hello

    device = Hello()
    async with served(device, vdev_socket_dir / "hello.sock"):
        pass
    assert not device.events.of_kind(Reset)


async def test_a_library_without_vdevs_patches_still_serves(
    vdev_socket_dir: Path, unpatched_libvfio_user: Library
) -> None:
    """A user's own libvfio-user build: no fix of tools/libvfio-user-patches, and the device works."""
    assert unpatched_libvfio_user.fixes == frozenset()
    device = Edu()
    path = vdev_socket_dir / "edu.sock"
    async with served(device, path, library=unpatched_libvfio_user), Client.connect(path) as client:
        await client.enable(memory=True, io=False, master=False)
        assert await client.read32(0, 0x00) == 0x010000ED
        await client.write32(0, 0x04, 0x1234)
        assert await client.read32(0, 0x04) == ~0x1234 & 0xFFFF_FFFF


class Strict(Device):
    """One register that takes 4-byte accesses only and fails any other."""

    vendor_id = 0x1B36
    device_id = 0x0F45
    bar0 = Bar(
        4096,
        registers=[Register("word", 0x0, access=RW, sizes=AccessSizes(reads=(4,), writes=(4,), refused=Refusal.ERROR))],
    )


async def test_an_access_a_size_policy_refuses_with_an_error_fails_only_that_access(
    vdev_client: ConnectClient, caplog: pytest.LogCaptureFixture
) -> None:
    from vdev.client import VfioUserError

    device = Strict()
    client = await vdev_client(device)
    await client.enable(memory=True, io=False, master=False)
    with caplog.at_level(logging.DEBUG, logger="vdev"):
        with pytest.raises(VfioUserError) as read_failed:
            await client.region_read(0, 0x0, 2)
        with pytest.raises(VfioUserError) as write_failed:
            await client.region_write(0, 0x0, b"\x01\x02")
    assert read_failed.value.errno == write_failed.value.errno == errno.EIO
    await client.write32(0, 0x0, 0x1234)
    assert await client.read32(0, 0x0) == 0x1234
    refused = [r for r in caplog.records if "AccessRefused" in r.getMessage()]
    assert len(refused) == 2 and not any(r.exc_info for r in refused)
    assert [e.size for e in device.events.of_kind(HandlerError)] == [2, 2]
