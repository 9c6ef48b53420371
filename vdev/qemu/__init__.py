"""Drive a real QEMU without a guest: qtest for memory, ports and IRQs, QMP for the rest.

This is how vdev tests its devices against the QEMU that will host them:
start a machine with the device attached, then do what firmware and a
driver would - enumerate, size and place BARs, poke registers, watch
interrupts and MSI writes, hot-plug and unplug.

    >>> async def main():                                        # doctest: +SKIP
    ...     async with QemuMachine(devices=["edu"]) as vm:
    ...         bus = await vm.pci_bus()
    ...         edu = await bus.find(0x1234, 0x11E8)
    ...         await edu.map_bars()
    ...         await edu.enable()
    ...         assert await edu.bar_readl(0, 0) == 0x010000ED

Needs the ``qemu`` extra (the ``qemu.qmp`` library).
"""

from vdev.qemu.cmdline import DeviceSpec, device_arg, qemu_command
from vdev.qemu.errors import (
    HotplugError,
    PciError,
    QemuError,
    QemuExitedError,
    QemuStartError,
    QmpClosedError,
    QmpCommandError,
    QTestClosedError,
    QTestError,
)
from vdev.qemu.guest import (
    GuestArtefacts,
    GuestError,
    GuestExitedError,
    GuestKernelError,
    GuestMachine,
    GuestResult,
    GuestTimeoutError,
    extra_initrd,
    guest_command,
    guest_dir,
    kernel_call_trace,
    kernel_problem_kinds,
    kernel_rip,
    parse_result,
)
from vdev.qemu.hotplug import hot_unplug
from vdev.qemu.memory import GuestMemoryAllocator
from vdev.qemu.msi import MsiMailbox, MsixTable, enable_msi, enable_msix
from vdev.qemu.pci import (
    BarInfo,
    BarSpace,
    PciAllocator,
    PciBus,
    PciFunction,
    PciWindows,
    q35_intx_gsi,
)
from vdev.qemu.pci_config import (
    ConfigAccess,
    EcamConfigAccess,
    PciAddress,
    PortConfigAccess,
    enable_q35_ecam,
)
from vdev.qemu.process import QemuMachine
from vdev.qemu.qmp import QmpClient, QmpEvents
from vdev.qemu.qtest import QTestClient

__all__ = [
    "GuestArtefacts",
    "GuestError",
    "GuestExitedError",
    "GuestKernelError",
    "GuestMachine",
    "GuestResult",
    "GuestTimeoutError",
    "extra_initrd",
    "guest_command",
    "guest_dir",
    "kernel_call_trace",
    "kernel_problem_kinds",
    "kernel_rip",
    "parse_result",
    "BarInfo",
    "BarSpace",
    "ConfigAccess",
    "DeviceSpec",
    "EcamConfigAccess",
    "GuestMemoryAllocator",
    "HotplugError",
    "MsiMailbox",
    "MsixTable",
    "PciAddress",
    "PciAllocator",
    "PciBus",
    "PciError",
    "PciFunction",
    "PciWindows",
    "PortConfigAccess",
    "QTestClient",
    "QTestClosedError",
    "QTestError",
    "QemuError",
    "QemuExitedError",
    "QemuMachine",
    "QemuStartError",
    "QmpClient",
    "QmpClosedError",
    "QmpCommandError",
    "QmpEvents",
    "device_arg",
    "enable_msi",
    "enable_msix",
    "enable_q35_ecam",
    "hot_unplug",
    "q35_intx_gsi",
    "qemu_command",
]
