"""vdev: emulated PCI devices in Python, served over vfio-user to real clients such as QEMU.

The public surface for writing devices is assembled here; the layers live
in subpackages, bottom to top: :mod:`vdev.protocol` (the sans-IO vfio-user
codec) and :mod:`vdev.libvfio_user` (ctypes bindings), :mod:`vdev.model`
(the device model), :mod:`vdev.runtime` (the Trio runtime),
:mod:`vdev.client`, :mod:`vdev.proxy`, :mod:`vdev.qemu` and
:mod:`vdev.testing` (the test kit), :mod:`vdev.cli`.

The names below are imported on first use, not when the package is: a
program that needs only the codec (``import vdev.protocol``) must not load
Trio, ctypes or libvfio-user because it sits inside this package.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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
    from vdev.model.config import CommandRegister
    from vdev.model.device import Device, Param, ResetKind
    from vdev.model.dma import DmaError
    from vdev.model.errors import DefinitionError
    from vdev.model.events import (
        AccessWhileDisabled,
        CommandChange,
        ConfigWrite,
        Connect,
        DeviceEvent,
        Disconnect,
        DmaMap,
        DmaRefused,
        DmaUnmap,
        EventLog,
        FaultInjected,
        HandlerError,
        Irq,
        MemoryAction,
        NegotiationTimeout,
        PeerRefused,
        PowerChange,
        Quiesce,
        RegionRead,
        RegionWrite,
        Reset,
        Violation,
    )
    from vdev.model.memory_enable import DisabledAccess, DisabledMapping, Prefault
    from vdev.model.registers import RO, RW, RW1C, W1S, WO, Access, AccessRefused, AccessSizes, Field, Refusal, Register
    from vdev.runtime import DeviceContext, ServeError, serve

#: Public name -> the module that defines it.
_EXPORTS: dict[str, str] = {
    "Bar": "vdev.model.bars",
    "BarKind": "vdev.model.bars",
    "MappedArea": "vdev.model.bars",
    "Capability": "vdev.model.capabilities",
    "DeviceSerialNumber": "vdev.model.capabilities",
    "Msi": "vdev.model.capabilities",
    "MsiX": "vdev.model.capabilities",
    "PciExpress": "vdev.model.capabilities",
    "PowerManagement": "vdev.model.capabilities",
    "RawCapability": "vdev.model.capabilities",
    "VendorSpecific": "vdev.model.capabilities",
    "VendorSpecificExtended": "vdev.model.capabilities",
    "CommandRegister": "vdev.model.config",
    "Device": "vdev.model.device",
    "Param": "vdev.model.device",
    "ResetKind": "vdev.model.device",
    "DmaError": "vdev.model.dma",
    "DefinitionError": "vdev.model.errors",
    "DisabledAccess": "vdev.model.memory_enable",
    "DisabledMapping": "vdev.model.memory_enable",
    "Prefault": "vdev.model.memory_enable",
    "AccessWhileDisabled": "vdev.model.events",
    "CommandChange": "vdev.model.events",
    "ConfigWrite": "vdev.model.events",
    "Connect": "vdev.model.events",
    "DeviceEvent": "vdev.model.events",
    "Disconnect": "vdev.model.events",
    "DmaMap": "vdev.model.events",
    "DmaRefused": "vdev.model.events",
    "DmaUnmap": "vdev.model.events",
    "FaultInjected": "vdev.model.events",
    "HandlerError": "vdev.model.events",
    "Irq": "vdev.model.events",
    "MemoryAction": "vdev.model.events",
    "PowerChange": "vdev.model.events",
    "NegotiationTimeout": "vdev.model.events",
    "PeerRefused": "vdev.model.events",
    "Quiesce": "vdev.model.events",
    "RegionRead": "vdev.model.events",
    "RegionWrite": "vdev.model.events",
    "Reset": "vdev.model.events",
    "Violation": "vdev.model.events",
    "EventLog": "vdev.model.events",
    "RO": "vdev.model.registers",
    "RW": "vdev.model.registers",
    "RW1C": "vdev.model.registers",
    "W1S": "vdev.model.registers",
    "WO": "vdev.model.registers",
    "Access": "vdev.model.registers",
    "AccessRefused": "vdev.model.registers",
    "AccessSizes": "vdev.model.registers",
    "Refusal": "vdev.model.registers",
    "Field": "vdev.model.registers",
    "Register": "vdev.model.registers",
    "DeviceContext": "vdev.runtime",
    "ServeError": "vdev.runtime",
    "serve": "vdev.runtime",
}

__all__ = [
    "RO",
    "RW",
    "RW1C",
    "W1S",
    "WO",
    "Access",
    "AccessWhileDisabled",
    "AccessRefused",
    "AccessSizes",
    "Bar",
    "BarKind",
    "Capability",
    "CommandChange",
    "CommandRegister",
    "ConfigWrite",
    "Connect",
    "DefinitionError",
    "Device",
    "DeviceContext",
    "DeviceEvent",
    "DeviceSerialNumber",
    "DisabledAccess",
    "DisabledMapping",
    "Disconnect",
    "DmaError",
    "DmaMap",
    "DmaRefused",
    "DmaUnmap",
    "EventLog",
    "FaultInjected",
    "Field",
    "HandlerError",
    "Irq",
    "MappedArea",
    "MemoryAction",
    "PowerChange",
    "Msi",
    "MsiX",
    "NegotiationTimeout",
    "Param",
    "PciExpress",
    "PeerRefused",
    "PowerManagement",
    "Prefault",
    "Quiesce",
    "RawCapability",
    "RegionRead",
    "RegionWrite",
    "Refusal",
    "Register",
    "Reset",
    "ResetKind",
    "ServeError",
    "VendorSpecific",
    "VendorSpecificExtended",
    "Violation",
    "serve",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'vdev' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
