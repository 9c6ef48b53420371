"""Constants of libvfio-user's API (``libvfio-user.h``) that the runtime passes to it.

Region indices and interrupt types are the vfio-user spec's own numbers
(libvfio-user's enums use the same values); they live with the protocol in
:mod:`vdev.protocol.constants`.
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
