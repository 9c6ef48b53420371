"""Constants from libvfio-user's ``libvfio-user.h`` and ``vfio-user.h``.

Kept apart from the prototypes so that the device model can name region
indices and IRQ types without loading the library.
"""

from __future__ import annotations

import enum

LIBVFIO_USER_FLAG_ATTACH_NB = 1 << 0

VFU_TRANS_SOCK = 0
VFU_DEV_TYPE_PCI = 0

VFU_REGION_FLAG_READ = 1 << 0
VFU_REGION_FLAG_WRITE = 1 << 1
VFU_REGION_FLAG_RW = VFU_REGION_FLAG_READ | VFU_REGION_FLAG_WRITE
VFU_REGION_FLAG_MEM = 1 << 2
VFU_REGION_FLAG_ALWAYS_CB = 1 << 3

PCI_HEADER_TYPE_NORMAL = 0


class RegionIndex(enum.IntEnum):
    """libvfio-user's PCI region indices (the vfio-user spec's numbering)."""

    BAR0 = 0
    BAR1 = 1
    BAR2 = 2
    BAR3 = 3
    BAR4 = 4
    BAR5 = 5
    ROM = 6
    CONFIG = 7
    VGA = 8
    MIGRATION = 9


class IrqType(enum.IntEnum):
    """``enum vfu_dev_irq_type``: the interrupt index spaces of a device."""

    INTX = 0
    MSI = 1
    MSIX = 2
    ERR = 3
    REQ = 4


class ResetType(enum.IntEnum):
    """``vfu_reset_type_t``: why the library asks the device to reset."""

    DEVICE = 0
    LOST_CONNECTION = 1
    FLR = 2


class PciType(enum.IntEnum):
    """``vfu_pci_type_t``: decides the config space size (256 B or 4 KiB)."""

    CONVENTIONAL = 0
    PCI_X_1 = 1
    PCI_X_2 = 2
    EXPRESS = 3
