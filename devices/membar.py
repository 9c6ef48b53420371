"""``membar``: a device built for memory-enable experiments.

Its BAR0 is plain RAM a client maps; its BAR2 registers let a client mark
epochs and let the device clear its own memory-enable bit; BAR4 interleaves
mapped and trapped pages.  The memory-enable policies are parameters, so the
same device reproduces vfio-pci's zap-and-SIGBUS (``mapping=revoke``), a
device that loses its memory (``mapping=discard``), or QEMU's expectation
that mappings stay valid (``mapping=keep``).
"""

from __future__ import annotations

from typing import Any

from vdev import (
    RO,
    RW,
    WO,
    Bar,
    Device,
    DeviceEvent,
    Msi,
    MsiX,
    Param,
    PciExpress,
    PowerManagement,
    RegionRead,
    RegionWrite,
    Register,
    Violation,
)
from vdev.model.capabilities import Capability
from vdev.model.memory_enable import DisabledAccess, DisabledMapping, Prefault

MiB = 1 << 20
PAGE = 4096


def _size(text: str) -> int:
    """A size such as ``16M``, ``1G``, ``65536`` or ``0x100000``."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper()
    if text and text[-1] in units:
        return int(text[:-1], 0) * units[text[-1]]
    return int(text, 0)


class MemBar(Device):
    """Memory-enable experiment device: mapped RAM, epoch doorbell, self-disable, MSI, MSI-X, FLR, D3hot.

    BAR0: ``size`` bytes (default 16 MiB), 64-bit prefetchable, all mapped (one memfd).

    BAR2 (4 KiB, 32-bit, trapped):

    ======  ============  ======  ==================================================
    offset  name          access  meaning
    ======  ============  ======  ==================================================
    0x00    epoch         RW      the client's epoch; each write is logged
    0x08    reads         RO      trapped reads of BAR2 and BAR4 so far
    0x10    writes        RO      trapped writes of BAR2 and BAR4 so far
    0x18    self_disable  WO      writing 1 makes the device clear its own MEM bit
    0x20    violations    RO      accesses refused while memory decoding was off
    0x28    bar0_size     RO      the size of BAR0 in bytes
    ======  ============  ======  ==================================================

    BAR4 (16 KiB, 32-bit): page 0 mapped, page 1 trapped (``scratch`` at
    0x1000, MSI-X table at 0x1800, PBA at 0x1c00), page 2 mapped (trapped
    with ``split_bar4=false``), page 3 trapped and empty.

    A Power Management capability offers D0 and D3hot (No_Soft_Reset set,
    so D3hot to D0 keeps the device's state): in D3hot the device decodes
    no memory, and the policies above apply as they do with MEM off.

    Two mapped areas in one BAR need vdev's libvfio-user patch 0001: the
    revision as it comes answers GET_REGION_INFO with one fd per area, and
    QEMU 11.1's vfio-user-pci refuses a reply with more than one fd
    ("unexpected FDs in reply").  ``split_bar4=false`` maps page 0 only, for
    such a library.
    """

    vendor_id = 0x1B36
    device_id = 0x0F01
    class_code = 0x058000
    express = True

    size = Param(16 * MiB, help="BAR0 size (power of two, e.g. 16M, 1G)", parser=_size)
    disabled_access = Param("master-abort", help="trapped access while MEM is off: pass, master-abort, error")
    mapping = Param("keep", help="mapped areas while MEM is off: keep, revoke, discard")
    prefault = Param("lazy", help="mapped pages on enable: lazy, populate")
    vectors = Param(4, help="MSI-X vectors")
    split_bar4 = Param(
        True,
        help="map BAR4 pages 0 and 2 around a trapped page 1; false: page 0 only (for an unpatched libvfio-user)",
    )

    bar2 = Bar(
        4096,
        registers=[
            Register("epoch", 0x00, width=8, access=RW),
            Register("reads", 0x08, width=8, access=RO),
            Register("writes", 0x10, width=8, access=RO),
            Register("self_disable", 0x18, width=4, access=WO),
            Register("violations", 0x20, width=8, access=RO),
            Register("bar0_size", 0x28, width=8, access=RO, sticky=True),
        ],
    )

    def __init__(self, name: str | None = None, **params: Any) -> None:
        super().__init__(name, **params)
        for bar in self.bars():
            bar.when_disabled = DisabledAccess(self.disabled_access)
            bar.mapping_when_disabled = DisabledMapping(self.mapping)
            bar.prefault = Prefault(self.prefault)
        self.bar2["bar0_size"] = self.size
        self.events.subscribe(self._count)

    def bar_specs(self) -> list[Bar]:
        size = self.size
        ram = Bar(size, kind="mem64", prefetchable=True, mapped=[(0, size)], index=0)
        mixed = Bar(
            4 * PAGE,
            mapped=[(0, PAGE), (2 * PAGE, PAGE)] if self.split_bar4 else [(0, PAGE)],
            registers=[Register("scratch", PAGE, width=4, access=RW, sticky=True)],
            index=4,
        )
        return [ram, *super().bar_specs(), mixed]

    def capabilities(self) -> list[Capability]:
        return [
            PowerManagement(),
            PciExpress(flr=True),
            MsiX(vectors=self.vectors, table_bar=4, table_offset=0x1800, pba_bar=4, pba_offset=0x1C00),
            Msi(vectors=4),
        ]

    def _count(self, event: DeviceEvent) -> None:
        if isinstance(event, Violation):
            self.bar2["violations"] += 1
        elif isinstance(event, RegionRead | RegionWrite) and event.region in (2, 4):
            counter = "reads" if isinstance(event, RegionRead) else "writes"
            self.bar2[counter] += 1

    @bar2.on_write("self_disable")
    def self_disable(self, value: int) -> None:
        if value & 1:
            self.command_control.force(memory=False)
