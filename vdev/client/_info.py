"""What the server tells the client about its device, minus the wire framing."""

from __future__ import annotations

from dataclasses import dataclass

from vdev.protocol import (
    DeviceFlag,
    IrqInfoFlag,
    RegionCapability,
    RegionFlag,
    RegionTypeCapability,
    SparseMmapArea,
    SparseMmapCapability,
)


@dataclass(frozen=True)
class DeviceInfo:
    """DEVICE_GET_INFO's answer."""

    flags: DeviceFlag
    num_regions: int
    num_irqs: int

    @property
    def resettable(self) -> bool:
        """The device accepts DEVICE_RESET."""
        return bool(self.flags & DeviceFlag.RESET)

    @property
    def is_pci(self) -> bool:
        return bool(self.flags & DeviceFlag.PCI)


@dataclass(frozen=True)
class IrqInfo:
    """GET_IRQ_INFO's answer for one interrupt type."""

    index: int
    flags: IrqInfoFlag
    count: int


@dataclass(frozen=True)
class RegionInfo:
    """GET_REGION_INFO's answer, with its capability chain unpacked.

    ``fds`` are the file descriptors that came with the reply; the client
    owns them and closes them when it closes.
    """

    index: int
    flags: RegionFlag
    size: int
    offset: int
    capabilities: tuple[RegionCapability, ...]
    fds: tuple[int, ...]

    @property
    def readable(self) -> bool:
        return bool(self.flags & RegionFlag.READ)

    @property
    def writable(self) -> bool:
        return bool(self.flags & RegionFlag.WRITE)

    @property
    def mappable(self) -> bool:
        """The region (or part of it, see ``mmap_areas``) can be mmap'ed."""
        return bool(self.flags & RegionFlag.MMAP)

    @property
    def sparse_areas(self) -> tuple[SparseMmapArea, ...] | None:
        """The sparse mmap areas, or ``None`` when the reply has no such capability."""
        for cap in self.capabilities:
            if isinstance(cap, SparseMmapCapability):
                return cap.areas
        return None

    @property
    def region_type(self) -> RegionTypeCapability | None:
        """The device-specific type of the region, if it declares one."""
        for cap in self.capabilities:
            if isinstance(cap, RegionTypeCapability):
                return cap
        return None

    @property
    def mmap_areas(self) -> tuple[SparseMmapArea, ...]:
        """What may be mapped: the sparse areas, else the whole region, else nothing."""
        if not self.mappable:
            return ()
        sparse = self.sparse_areas
        return sparse if sparse is not None else (SparseMmapArea(0, self.size),)

    @property
    def fd(self) -> int | None:
        """The fd to mmap, when the reply carried one."""
        return self.fds[0] if self.fds else None
