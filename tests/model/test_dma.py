"""DMA as device code sees it: ranges over adjacent mappings, refusals, lookups among many mappings."""

from __future__ import annotations

import pytest

from vdev import Device, DmaError
from vdev.model.dma import DmaMapping
from vdev.model.events import Violation


class Port:
    """Client memory as one flat bytearray; records each transfer the model hands it."""

    def __init__(self, size: int) -> None:
        self.memory = bytearray(size)
        self.transfers: list[tuple[str, int, int]] = []

    async def dma_read(self, address: int, size: int) -> bytes:
        self.transfers.append(("read", address, size))
        return bytes(self.memory[address : address + size])

    async def dma_write(self, address: int, data: bytes) -> None:
        self.transfers.append(("write", address, len(data)))
        self.memory[address : address + len(data)] = data


def device_with(regions: list[tuple[int, int]], master: bool = True) -> tuple[Device, Port]:
    device = Device()
    device.config.write(0x04, (0x4 if master else 0).to_bytes(2, "little"))
    port = Port(0x10_0000)
    device.dma.port = port
    for iova, size in regions:
        device.dma.add(DmaMapping(iova, size, True))
    return device, port


async def test_a_range_over_adjacent_mappings_is_split_at_their_edges() -> None:
    device, port = device_with([(0x2000, 0x1000), (0x1000, 0x1000), (0x3000, 0x1000)])
    await device.dma.write(0x1800, b"x" * 0x2000)
    assert port.transfers == [("write", 0x1800, 0x800), ("write", 0x2000, 0x1000), ("write", 0x3000, 0x800)]
    assert await device.dma.read(0x1F00, 0x200) == b"x" * 0x200
    assert port.transfers[3:] == [("read", 0x1F00, 0x100), ("read", 0x2000, 0x100)]


@pytest.mark.parametrize(
    ("address", "size"),
    [(0x0F00, 0x200), (0x1F00, 0x2000), (0x4000, 8), (0x2FFF, 2)],
    ids=["starts-before", "runs-into-a-gap", "past-the-end", "ends-in-the-gap"],
)
async def test_a_range_with_any_unmapped_byte_is_refused_whole(address: int, size: int) -> None:
    device, port = device_with([(0x1000, 0x2000), (0x3001, 0x1000)])
    with pytest.raises(DmaError, match="not inside memory the client mapped"):
        await device.dma.write(address, b"z" * size)
    assert port.transfers == []
    assert device.events.of_kind(Violation)[-1].address == address


async def test_no_dma_without_bus_mastering() -> None:
    device, port = device_with([(0, 0x1000)], master=False)
    with pytest.raises(DmaError, match="bus mastering"):
        await device.dma.read(0, 4)
    assert port.transfers == []


def test_lookups_among_many_mappings_and_after_unmapping() -> None:
    device, _ = device_with([(page * 0x1000, 0x1000) for page in range(0, 20_000, 2)])
    assert device.dma.find(0x3FFF) is None
    found = device.dma.find(0x4_2123)
    assert found is not None and found.iova == 0x4_2000
    assert device.dma.pieces(0x4_2000, 0x1001) is None
    device.dma.remove(0x4_2000)
    assert device.dma.find(0x4_2123) is None
    assert device.dma.pieces(0x4_4000, 0x1000) == [(0x4_4000, 0x1000)]
