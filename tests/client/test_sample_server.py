"""The client against a real peer: libvfio-user's C sample server.

What the sample offers (samples/server.c): BAR0 is an 8-byte trapped register
holding a time_t; writing a future time arms a timer that, when it fires,
triggers INTx 0 and then DMA-writes 4 KiB of 'A' to the first DMA region and
reads it back over DMA_WRITE/DMA_READ messages.  BAR1 is 3 pages in a file,
of which pages 0 and 2 are sparse-mmap'able.  Region 9 is libvfio-user's
(pre-spec) migration region.
"""

from __future__ import annotations

import errno
import os
import struct
import time
from typing import TYPE_CHECKING

import pytest
import trio

from vdev.client import Client, DmaAccess, ServerDisconnected, VfioUserError
from vdev.protocol import (
    Command,
    DeviceFeatureRequest,
    DmaMapReply,
    DmaMapRequest,
    DmaUnmapRequest,
    ErrorReply,
    Feature,
    FeatureFlag,
    IrqIndex,
    IrqInfoFlag,
    RawRequest,
    RegionFlag,
    RegionIndex,
    RegionInfoRequest,
    RegionIoFdsRequest,
    RegionTypeCapability,
    SparseMmapArea,
)

if TYPE_CHECKING:
    from .conftest import SampleServer

TIME_T = struct.Struct("=q")
DMA_IOVA = 0x10_0000
DMA_SIZE = 0x4000
#: What the sample server's timer writes into the first DMA region.
DMA_PATTERN = b"A" * 4096


async def _bar0_time(client: Client) -> int:
    (value,) = TIME_T.unpack(await client.region_read(RegionIndex.BAR0, 0, TIME_T.size))
    return int(value)


async def _fire_timer(client: Client) -> None:
    """Arm the sample's BAR0 timer to fire within two seconds.

    It counts whole seconds from the server's clock, so "now + 1" could round
    to zero (a disarmed timer); two is always at least one.
    """
    await client.region_write(RegionIndex.BAR0, 0, TIME_T.pack(int(time.time()) + 2))


def _server_memory(server: SampleServer, name: str, size: int) -> bytes:
    """Read ``size`` bytes of the server's mapping of ``name`` via /proc."""
    with open(f"/proc/{server.pid}/maps") as maps:
        line = next(line for line in maps if name in line)
    start = int(line.split("-", 1)[0], 16)
    with open(f"/proc/{server.pid}/mem", "rb") as memory:
        memory.seek(start)
        return memory.read(size)


# --- negotiation and discovery ---------------------------------------------------


async def test_negotiation_reports_the_servers_version_and_capabilities(client: Client) -> None:
    assert client.server_version == (0, 1)
    caps = client.server_capabilities
    assert caps.max_msg_fds == 8
    assert caps.max_data_xfer_size == 1024 * 1024
    # Not in the spec: the bundled libvfio-user still announces v1 migration.
    assert caps.migration is not None and caps.migration.pgsize == os.sysconf("SC_PAGE_SIZE")


async def test_a_major_version_the_server_does_not_speak_is_refused(
    sample_server: SampleServer,
) -> None:
    async with Client.connect(sample_server.socket, negotiate=False) as client:
        with pytest.raises(VfioUserError) as caught:
            await client.negotiate(version=(1, 0))
        assert caught.value.errno == errno.EINVAL
        assert caught.value.command == Command.VERSION
        with pytest.raises(ServerDisconnected):
            await client.receive_raw()


async def test_a_first_message_other_than_version_is_refused(
    sample_server: SampleServer,
) -> None:
    async with Client.connect(sample_server.socket, negotiate=False) as client:
        with pytest.raises(VfioUserError) as caught:
            await client.device_info()
        assert caught.value.errno == errno.EINVAL
        with pytest.raises(ServerDisconnected):
            await client.device_info()


async def test_device_info(client: Client) -> None:
    info = await client.device_info()
    assert info.is_pci and info.resettable
    assert info.num_regions == 10  # BARs, ROM, config, VGA, migration
    assert info.num_irqs == 5  # INTx, MSI, MSI-X, ERR, REQ


async def test_irq_info(client: Client) -> None:
    counts = {index: (await client.irq_info(index)).count for index in IrqIndex}
    assert counts == {
        IrqIndex.INTX: 1,
        IrqIndex.MSI: 0,
        IrqIndex.MSIX: 0,
        IrqIndex.ERR: 1,
        IrqIndex.REQ: 1,
    }
    assert (await client.irq_info(IrqIndex.INTX)).flags == IrqInfoFlag.EVENTFD


async def test_bar0_is_a_trapped_region(client: Client) -> None:
    info = await client.region_info(RegionIndex.BAR0)
    assert info.size == 8
    assert info.readable and info.writable and not info.mappable
    assert info.capabilities == () and info.fds == ()
    assert info.mmap_areas == ()


async def test_bar1_is_sparse_mappable_with_one_fd_for_both_areas(client: Client) -> None:
    info = await client.region_info(RegionIndex.BAR1)
    assert info.size == 0x3000
    assert info.flags == RegionFlag.READ | RegionFlag.WRITE | RegionFlag.MMAP
    assert info.sparse_areas == (SparseMmapArea(0, 0x1000), SparseMmapArea(0x2000, 0x1000))
    # One fd per region, areas as offsets into it (libvfio-user patch 0001; it sent one per area).
    (fd,) = info.fds
    assert os.fstat(fd).st_size >= info.offset + info.size


async def test_a_small_argsz_gets_the_needed_size_instead_of_capabilities(
    client: Client,
) -> None:
    reply = await client.request(RegionInfoRequest(index=RegionIndex.BAR1, argsz=32))
    assert reply.capabilities == () and reply.fds == ()
    assert reply.argsz == 32 + 8 + 8 + 2 * 16  # struct + sparse header + two areas


async def test_the_migration_region_declares_its_type(client: Client) -> None:
    info = await client.region_info(9)
    assert info.region_type == RegionTypeCapability(type=3, subtype=1)
    assert info.offset == 0x3000  # after BAR1 in the same backing file
    assert info.sparse_areas == (SparseMmapArea(0x1000, 0x4000),)


async def test_config_space_is_the_conventional_256_bytes(client: Client) -> None:
    assert (await client.region_info(RegionIndex.CONFIG)).size == 256
    vendor, device = struct.unpack("=HH", await client.region_read(RegionIndex.CONFIG, 0, 4))
    assert (vendor, device) == (0xDEAD, 0xBEEF)


async def test_no_region_has_io_fds(client: Client) -> None:
    reply = await client.request(RegionIoFdsRequest(index=RegionIndex.BAR0, argsz=1024))
    assert reply.total == 0 and reply.sub_regions == () and reply.fds == ()


# --- region access --------------------------------------------------------------


async def test_bar0_write_then_read_through_the_socket(client: Client) -> None:
    deadline = int(time.time()) + 3600
    await client.region_write(RegionIndex.BAR0, 0, TIME_T.pack(deadline))
    # Reading BAR0 returns now - the stored time: about minus one hour.
    assert -3601 <= await _bar0_time(client) <= -3599


async def test_an_access_the_device_refuses_is_an_error_reply(client: Client) -> None:
    with pytest.raises(VfioUserError) as caught:
        await client.region_read(RegionIndex.BAR0, 0, 4)
    assert caught.value.errno == errno.EINVAL
    assert caught.value.command == Command.REGION_READ
    assert (await client.device_info()).num_regions == 10


async def test_a_posted_write_is_applied_before_the_next_request(client: Client) -> None:
    await client.region_write(RegionIndex.BAR0, 0, TIME_T.pack(int(time.time()) + 7200), posted=True)
    assert -7201 <= await _bar0_time(client) <= -7199
    with trio.move_on_after(0.2):
        unexpected = await client.receive_raw()
        pytest.fail(f"a posted write was answered: {unexpected}")


async def test_bar1_mapping_shares_memory_with_the_server(client: Client) -> None:
    bar1 = await client.map_region(RegionIndex.BAR1)
    bar1.write(0, b"mapped")
    # The sample's BAR1 read handler ignores the offset; offset 0 is safe.
    assert await client.region_read(RegionIndex.BAR1, 0, 6) == b"mapped"
    await client.region_write(RegionIndex.BAR1, 0x2000, b"trapped")
    assert bar1.read(0x2000, 7) == b"trapped"
    with pytest.raises(ValueError, match="not inside one mapped area"):
        bar1.read(0x1000, 4)


async def test_a_trapped_region_cannot_be_mapped(client: Client) -> None:
    with pytest.raises(ValueError, match="nothing to mmap"):
        await client.map_region(RegionIndex.BAR0)


# --- interrupts -----------------------------------------------------------------


async def test_the_client_can_make_the_device_trigger_intx(client: Client) -> None:
    (intx,) = await client.set_irqs(IrqIndex.INTX)
    with trio.fail_after(5):
        await client.signal_irqs(IrqIndex.INTX)
        assert await intx.wait() == 1
        await client.signal_irqs(IrqIndex.INTX, which=[True])
        assert await intx.wait() == 1
    await client.signal_irqs(IrqIndex.INTX, which=[False])
    assert intx.pending() == 0


async def test_disabled_interrupts_stay_silent(client: Client, sample_server: SampleServer) -> None:
    (intx,) = await client.set_irqs(IrqIndex.INTX)
    await client.disable_irqs(IrqIndex.INTX)
    await sample_server.wait_for_log("disabling IRQ type INTx")
    await client.signal_irqs(IrqIndex.INTX)
    assert intx.pending() == 0


async def test_an_irq_range_past_the_count_is_refused(client: Client) -> None:
    with pytest.raises(VfioUserError) as caught:
        await client.set_irqs(IrqIndex.INTX, start=0, count=2)
    assert caught.value.errno == errno.EINVAL


# --- DMA ------------------------------------------------------------------------


async def test_private_memory_is_reached_through_dma_messages(client: Client) -> None:
    region = await client.dma_map_private(DMA_IOVA, DMA_SIZE)
    (intx,) = await client.set_irqs(IrqIndex.INTX)
    await _fire_timer(client)
    with trio.fail_after(10):
        assert await intx.wait() == 1
        accesses = await region.wait_accesses(2)
    assert accesses == [DmaAccess("write", 0, 4096), DmaAccess("read", 0, 4096)]
    assert region.read(0, 4096) == DMA_PATTERN
    assert region.read(4096, 16) == bytes(16)


async def test_memfd_memory_is_mapped_by_the_server(client: Client, sample_server: SampleServer) -> None:
    region = await client.dma_map_memfd(DMA_IOVA, DMA_SIZE)
    assert region.fd is not None
    await sample_server.wait_for_log("adding DMA region")
    region.write(0x100, b"shared with the device")
    try:
        seen_by_server = _server_memory(sample_server, "memfd:vdev-dma", DMA_SIZE)
    except PermissionError:
        pytest.skip("ptrace restrictions hide the server's memory")
    assert seen_by_server[0x100:0x116] == b"shared with the device"
    # The sample still uses messages for its own DMA; they land in the memfd.
    (intx,) = await client.set_irqs(IrqIndex.INTX)
    await _fire_timer(client)
    with trio.fail_after(10):
        await intx.wait()
        await region.wait_accesses(2)
    assert region.read(0, 4096) == DMA_PATTERN
    assert _server_memory(sample_server, "memfd:vdev-dma", 4096) == DMA_PATTERN


async def test_unmapping_releases_the_region(client: Client, sample_server: SampleServer) -> None:
    region = await client.dma_map_private(DMA_IOVA, DMA_SIZE)
    await client.dma_unmap(region)
    await sample_server.wait_for_log("removing DMA region")
    with pytest.raises(VfioUserError) as caught:
        await client.request(DmaUnmapRequest(address=DMA_IOVA, size=DMA_SIZE))
    assert caught.value.errno == errno.ENOENT


async def test_overlapping_and_repeated_maps(client: Client) -> None:
    await client.dma_map_private(DMA_IOVA, DMA_SIZE)
    # The spec asks for EEXIST; this libvfio-user says EINVAL for an overlap...
    with pytest.raises(VfioUserError) as caught:
        await client.request(DmaMapRequest(address=DMA_IOVA + 0x1000, size=0x1000))
    assert caught.value.errno == errno.EINVAL
    # ...and accepts an identical map again.
    again = await client.request(DmaMapRequest(address=DMA_IOVA, size=DMA_SIZE))
    assert isinstance(again, DmaMapReply)


# --- reset, unsupported commands, raw mode ---------------------------------------


async def test_device_reset_runs_the_devices_reset_callback(client: Client, sample_server: SampleServer) -> None:
    await client.device_reset()
    await sample_server.wait_for_log("device reset callback")


async def test_spec_commands_newer_than_this_libvfio_user_are_refused(client: Client) -> None:
    with pytest.raises(VfioUserError) as caught:
        await client.request(DeviceFeatureRequest(flags=FeatureFlag.PROBE | Feature.MIGRATION))
    assert caught.value.errno == errno.EINVAL


async def test_an_unknown_command_gets_an_error_reply(client: Client) -> None:
    with pytest.raises(VfioUserError) as caught:
        await client.request(RawRequest(command=0x77, payload=b"12345678"))
    assert (caught.value.errno, caught.value.command) == (errno.EINVAL, 0x77)


async def test_garbage_header_gets_an_error_reply_and_the_session_survives(
    client: Client,
) -> None:
    # 0xef: type 15 (neither command nor reply), NO_REPLY clear, size huge.
    await client.send_raw(b"\xef" * 16)
    reply = await client.receive_raw()
    assert isinstance(reply, ErrorReply)
    assert (reply.msg_id, reply.errno) == (0xEFEF, errno.EINVAL)
    assert (await client.device_info()).num_irqs == 5


@pytest.mark.parametrize(
    ("raw", "msg_id"),
    [
        (struct.pack("=HHIII", 0x501, Command.DEVICE_GET_INFO, 8, 0, 0), 0x501),
        (struct.pack("=HHIII", 0x502, Command.DEVICE_GET_INFO, 16, 0, 0), 0x502),
        (
            struct.pack("=HHIII", 0x503, Command.REGION_WRITE, 16 + 16 + 2, 0, 0)
            + struct.pack("=QII", 0, 0, 8)
            + b"ab",
            0x503,
        ),
    ],
    ids=["size-below-header", "missing-payload", "count-beyond-data"],
)
async def test_malformed_requests_get_einval(client: Client, raw: bytes, msg_id: int) -> None:
    await client.send_raw(raw)
    reply = await client.receive_raw()
    assert isinstance(reply, ErrorReply)
    assert (reply.msg_id, reply.errno) == (msg_id, errno.EINVAL)


async def test_a_torn_header_makes_the_server_hang_up(client: Client, sample_server: SampleServer) -> None:
    await client.send_raw(b"\x01\x00\x04\x00\x20")
    with trio.fail_after(5), pytest.raises(ServerDisconnected):
        await client.receive_raw()
    assert await sample_server.wait_exit() == 0
    with pytest.raises(ServerDisconnected):
        await client.device_info()


async def test_a_killed_server_fails_the_next_call(client: Client, sample_server: SampleServer) -> None:
    sample_server.process.kill()
    with trio.fail_after(5), pytest.raises(ServerDisconnected):
        await client.device_info()
