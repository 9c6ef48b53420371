# Rules of this module:
#
# * Only numbers fixed by the vfio-user spec or by <linux/vfio.h>, which the
#   spec reuses; no behaviour.
# * Bit sets are ``IntFlag`` so decoded values print by name and keep any bit
#   this module does not know; indices and states are ``IntEnum``.
"""Flag bits, indices and states that messages carry."""

from __future__ import annotations

import enum


class DmaFlag(enum.IntFlag):
    """DMA_MAP ``flags``: what the server may do with the client's memory."""

    READ = 1 << 0
    WRITE = 1 << 1


class DeviceFlag(enum.IntFlag):
    """DEVICE_GET_INFO ``flags`` (``VFIO_DEVICE_FLAGS_*``)."""

    RESET = 1 << 0
    PCI = 1 << 1


class RegionFlag(enum.IntFlag):
    """GET_REGION_INFO ``flags`` (``VFIO_REGION_INFO_FLAG_*``)."""

    READ = 1 << 0
    WRITE = 1 << 1
    MMAP = 1 << 2
    CAPS = 1 << 3


class IrqInfoFlag(enum.IntFlag):
    """GET_IRQ_INFO ``flags`` (``VFIO_IRQ_INFO_*``)."""

    EVENTFD = 1 << 0
    MASKABLE = 1 << 1
    AUTOMASKED = 1 << 2
    NORESIZE = 1 << 3


class IrqSetFlag(enum.IntFlag):
    """SET_IRQS ``flags``: one DATA_* kind and one ACTION_* (``VFIO_IRQ_SET_*``)."""

    DATA_NONE = 1 << 0
    DATA_BOOL = 1 << 1
    DATA_EVENTFD = 1 << 2
    ACTION_MASK = 1 << 3
    ACTION_UNMASK = 1 << 4
    ACTION_TRIGGER = 1 << 5


class IrqIndex(enum.IntEnum):
    """Interrupt types of a PCI device (``VFIO_PCI_*_IRQ_INDEX``)."""

    INTX = 0
    MSI = 1
    MSIX = 2
    ERR = 3
    REQ = 4


class RegionIndex(enum.IntEnum):
    """Standard regions of a PCI device (``VFIO_PCI_*_REGION_INDEX``)."""

    BAR0 = 0
    BAR1 = 1
    BAR2 = 2
    BAR3 = 3
    BAR4 = 4
    BAR5 = 5
    ROM = 6
    CONFIG = 7
    VGA = 8


class IoFdType(enum.IntEnum):
    """GET_REGION_IO_FDS sub-region kinds (``VFIO_USER_IO_FD_TYPE_*``)."""

    IOEVENTFD = 0
    IOREGIONFD = 1


class FeatureFlag(enum.IntFlag):
    """DEVICE_FEATURE ``flags`` above the 16-bit feature index."""

    GET = 1 << 16
    SET = 1 << 17
    PROBE = 1 << 18


#: The low 16 bits of DEVICE_FEATURE ``flags`` select the feature.
FEATURE_INDEX_MASK = 0xFFFF


class Feature(enum.IntEnum):
    """DEVICE_FEATURE indices that vfio-user supports."""

    MIGRATION = 1
    MIG_DEVICE_STATE = 2
    DMA_LOGGING_START = 6
    DMA_LOGGING_STOP = 7
    DMA_LOGGING_REPORT = 8


class MigrationFlag(enum.IntFlag):
    """Data of the MIGRATION feature: which optional states are supported."""

    STOP_COPY = 1 << 0
    P2P = 1 << 1
    PRE_COPY = 1 << 2


class DeviceState(enum.IntEnum):
    """Migration states (``enum vfio_device_mig_state``)."""

    ERROR = 0
    STOP = 1
    RUNNING = 2
    STOP_COPY = 3
    RESUMING = 4
    RUNNING_P2P = 5
    PRE_COPY = 6
    PRE_COPY_P2P = 7
