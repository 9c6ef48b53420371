"""vdev: emulated PCI devices in Python, served over vfio-user to real clients such as QEMU.

The public surface for writing devices is assembled here; the layers live
in subpackages: :mod:`vdev.libvfio_user` (ctypes bindings), :mod:`vdev.model`
(the device model), :mod:`vdev.runtime` (Trio runtime), :mod:`vdev.cli`.
"""

from vdev.model.bars import Bar, BarKind, MappedArea
from vdev.model.capabilities import (
    Capability,
    DeviceSerialNumber,
    Msi,
    MsiX,
    PciExpress,
    PowerManagement,
    RawCapability,
    VendorSpecific,
    VendorSpecificExtended,
)
from vdev.model.config import Command
from vdev.model.device import Device, Param, ResetKind
from vdev.model.dma import DmaError
from vdev.model.events import Event, EventLog
from vdev.model.registers import RO, RW, RW1C, W1S, WO, Access, Field, Register
from vdev.runtime import DeviceContext, ServeError, serve

__all__ = [
    "RO",
    "RW",
    "RW1C",
    "W1S",
    "WO",
    "Access",
    "Bar",
    "BarKind",
    "Capability",
    "Command",
    "Device",
    "DeviceContext",
    "DeviceSerialNumber",
    "DmaError",
    "Event",
    "EventLog",
    "Field",
    "MappedArea",
    "Msi",
    "MsiX",
    "Param",
    "PciExpress",
    "PowerManagement",
    "RawCapability",
    "Register",
    "ResetKind",
    "ServeError",
    "VendorSpecific",
    "VendorSpecificExtended",
    "serve",
]
