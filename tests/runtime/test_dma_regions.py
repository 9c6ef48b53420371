"""DMA regions through vdev's client: many of them, repeated maps, and message DMA at an offset.

libvfio-user as it comes takes 16 DMA regions and never says so, leaks the fd
of a repeated identical DMA_MAP, and sends message DMA to the start of the
region whatever the offset; vdev's patches 0004, 0006 and 0005 fix that.
The fd counts are the server's own: ``vdev serve edu`` runs in a process
of its own, on a socket this test created (so it needs no waiting for the
server to be ready), and its fds are read from ``/proc/PID/fd``.
"""

from __future__ import annotations

import os
import resource
from pathlib import Path

import pytest
import trio

from tests.runtime.inherited import finish, listening, start
from vdev.client import Client, DmaRegion, Interrupt
from vdev.libvfio_user import Library
from vdev.protocol import DmaMapRequest
from vdev.protocol.constants import IrqIndex
from vdev.testing import served
from vdev_devices.edu import Edu

pytestmark = pytest.mark.requires("libvfio-user")

REGIONS = 1000
EDU_BUFFER = 0x40000
EDU_DMA_SOURCE, EDU_DMA_DESTINATION, EDU_DMA_COUNT, EDU_DMA_COMMAND = 0x80, 0x88, 0x90, 0x98
EDU_DMA_START, EDU_DMA_TO_RAM, EDU_DMA_IRQ = 0x1, 0x2, 0x4
EDU_IRQ_ACK, EDU_IRQ_DMA = 0x64, 0x100


async def edu_dma(client: Client, intx: Interrupt, source: int, destination: int, count: int, to_ram: bool) -> None:
    """One edu DMA transfer; returns after its completion interrupt.

    The parameters and the acknowledgement are posted writes (no reply): the
    server handles messages in order, so the command write, which is
    answered, comes after them.
    """
    for offset, value in ((EDU_DMA_SOURCE, source), (EDU_DMA_DESTINATION, destination), (EDU_DMA_COUNT, count)):
        await client.write64(0, offset, value, posted=True)
    await client.write64(0, EDU_DMA_COMMAND, EDU_DMA_START | EDU_DMA_IRQ | (EDU_DMA_TO_RAM if to_ram else 0))
    with trio.fail_after(30):
        await intx.wait()
    await client.write32(0, EDU_IRQ_ACK, EDU_IRQ_DMA, posted=True)


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.fixture
def enough_fds() -> None:
    """Room for 1,000 memfds on each side (the server inherits the limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 4 * REGIONS
    if soft < wanted:
        if hard != resource.RLIM_INFINITY and hard < wanted:
            pytest.fail(f"RLIMIT_NOFILE's hard limit is {hard}; this test needs {wanted} fds")
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


@pytest.mark.usefixtures("enough_fds")
async def test_a_thousand_regions_mapped_used_and_unmapped_give_back_every_fd(vdev_socket_dir: Path) -> None:
    path = vdev_socket_dir / "edu.sock"
    with listening(path) as listener:
        server = start(listener, "", "serve", "edu", "--fd", "3", "--param", "dma_delay=0")
    try:
        async with Client.connect(path) as client:
            assert client.server_capabilities.max_dma_maps == 65535
            await client.enable(memory=True, io=False, master=True)
            (intx,) = await client.set_irqs(IrqIndex.INTX, 0, 1)
            before = open_fds(server.pid)

            regions: list[DmaRegion] = []
            for number in range(REGIONS):
                regions.append(await client.dma_map_memfd(0x10_0000 + number * 0x2000, 0x1000))
            assert open_fds(server.pid) == before + REGIONS  # each region keeps its memfd

            # Each region is read and written by the device: 8 bytes from it, 8 bytes back further in.
            for number, region in enumerate(regions):
                region.write(0x10, number.to_bytes(8, "little"))
                await edu_dma(client, intx, region.iova + 0x10, EDU_BUFFER, 8, to_ram=False)
                await edu_dma(client, intx, EDU_BUFFER, region.iova + 0xFF0, 8, to_ram=True)
            assert [int.from_bytes(r.read(0xFF0, 8), "little") for r in regions] == list(range(REGIONS))

            # The same map again, fd and all, three times: nothing more is kept.
            first = regions[0]
            assert first.fd is not None
            for _ in range(3):
                await client.request(
                    DmaMapRequest(address=first.iova, size=first.size, flags=first.flags, fds=(first.fd,))
                )
            assert open_fds(server.pid) == before + REGIONS

            for region in regions:
                await client.dma_unmap(region)
            assert open_fds(server.pid) == before
    finally:
        status, stderr = finish(server, stop=True)
    assert status == 0, stderr


async def test_message_dma_at_an_offset_without_patch_0005(
    vdev_socket_dir: Path, unpatched_libvfio_user: Library
) -> None:
    """vdev folds the offset into the address for a library without the fix (bindings.DmaSg)."""
    device = Edu(dma_delay=0)
    path = vdev_socket_dir / "edu.sock"
    async with served(device, path, library=unpatched_libvfio_user), Client.connect(path) as client:
        await client.enable(memory=True, io=False, master=True)
        (intx,) = await client.set_irqs(IrqIndex.INTX, 0, 1)
        region = await client.dma_map_private(0x10_0000, 0x4000)
        region.write(0x100, b"at an offset")
        await edu_dma(client, intx, region.iova + 0x100, EDU_BUFFER, 12, to_ram=False)
        await edu_dma(client, intx, EDU_BUFFER, region.iova + 0x2000, 12, to_ram=True)
        assert region.read(0x2000, 12) == b"at an offset"
        assert [(a.kind, a.offset, a.size) for a in region.accesses] == [("read", 0x100, 12), ("write", 0x2000, 12)]
