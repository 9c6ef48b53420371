"""Hot-unplugging a PCI device under qtest, playing the guest's part of ACPI hotplug.

``device_del`` only *asks* for a hot-pluggable PCI device to go: QEMU raises
an ACPI event and waits for the guest's AML to write the slot's bit to the
eject register.  A qtest machine has no guest, so the test writes it.  QEMU's
ACPI PCI hotplug registers (``hw/acpi/pcihp.c``), at an I/O base the ACPI
device publishes as ``acpi-pcihp-io-base`` (``0xae00`` on ``pc``, ``0xcc0``
on ``q35``)::

    +0x08  eject: write ``1 << slot`` to eject that slot of the selected bus
    +0x10  bus select: write a bus's ``acpi-pcihp-bsel`` number

Which buses take part: on ``pc`` the root bus and PCI bridges; on ``q35``
root ports and bridges (devices directly on ``pcie.0`` cannot be hot-plugged
at all).  Verified against QEMU 11.1 on both machines.
"""

from __future__ import annotations

from vdev.qemu.errors import HotplugError, QmpCommandError
from vdev.qemu.qmp import QmpClient
from vdev.qemu.qtest import QTestClient

_ACPI_DEVICE = "/machine/acpi-device"
_EJECT = 0x08
_BUS_SELECT = 0x10


async def hot_unplug(qmp: QmpClient, qtest: QTestClient, device_id: str) -> None:
    """Remove PCI device ``device_id`` as an ACPI guest would; return once it is gone."""
    device_path = f"/machine/peripheral/{device_id}"
    try:
        io_base = await qmp.qom_get(_ACPI_DEVICE, "acpi-pcihp-io-base")
        devfn = await qmp.qom_get(device_path, "addr")
        bus_path = await qmp.qom_get(device_path, "parent_bus")
    except QmpCommandError as exc:
        raise HotplugError(f"cannot hot-unplug {device_id!r}: {exc.description}") from exc
    try:
        bus_select = await qmp.qom_get(bus_path, "acpi-pcihp-bsel")
    except QmpCommandError as exc:
        raise HotplugError(f"cannot hot-unplug {device_id!r}: its bus {bus_path} has no ACPI hotplug") from exc

    async def eject() -> None:
        await qtest.outl(io_base + _BUS_SELECT, bus_select)
        await qtest.outl(io_base + _EJECT, 1 << (devfn >> 3))

    await qmp.device_del(device_id, acknowledge=eject)
