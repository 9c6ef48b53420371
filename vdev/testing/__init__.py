"""Helpers for testing vdev devices — public API, used by vdev's own suite and by users.

A test of a device usually needs no socket at all:

* :func:`open_bench` (fixture ``vdev_bench``) puts a device on the
  :class:`Bench`: config space, BAR registers by name or offset, COMMAND,
  a :class:`RecordingSink` of the interrupts that fired, client memory for
  DMA, reset — through the entry points the runtime uses;
* :func:`check_pci_conformance` checks config space against PCI's rules,
  on the bench or through :class:`vdev.client.Client` on any server;
* :class:`ScriptedServer` (fixture ``vdev_scripted_server``) is the other
  end of a vfio-user connection, stepped message by message, for testing
  client code.

For the real transport, the pytest plugin (:mod:`vdev.testing.plugin`,
registered through the ``pytest11`` entry point) serves a device
(``vdev_serve``), connects vdev's client to it (``vdev_client``) or attaches
it to QEMU in qtest mode (``vdev_qemu``) or boots a Linux guest with it
attached (``vdev_guest``), and cleans up after the test.
"""

from vdev.testing.bench import Bench, ClientMemory, DmaTransfer, Fired, RecordingSink, open_bench
from vdev.testing.conformance import (
    ConfigPort,
    ConformanceError,
    ConformanceReport,
    SizedBar,
    check_pci_conformance,
)
from vdev.testing.memory import first_touch_ns, mapping_address, resident_pages
from vdev.testing.peer import ScriptedConnection, ScriptedServer, UnexpectedMessage, open_scripted_server
from vdev.testing.serving import (
    ALL_COMMAND_BITS,
    AttachQemu,
    BootGuest,
    CommandBit,
    ConnectClient,
    OpenBench,
    QemuAttached,
    ServeDevice,
    qemu_attached,
    served,
    vfio_user_pci,
)

__all__ = [
    "ALL_COMMAND_BITS",
    "AttachQemu",
    "Bench",
    "BootGuest",
    "ClientMemory",
    "CommandBit",
    "ConfigPort",
    "ConformanceError",
    "ConformanceReport",
    "ConnectClient",
    "DmaTransfer",
    "Fired",
    "OpenBench",
    "QemuAttached",
    "RecordingSink",
    "ScriptedConnection",
    "ScriptedServer",
    "ServeDevice",
    "SizedBar",
    "UnexpectedMessage",
    "check_pci_conformance",
    "first_touch_ns",
    "mapping_address",
    "open_bench",
    "open_scripted_server",
    "qemu_attached",
    "resident_pages",
    "served",
    "vfio_user_pci",
]
