"""Serving a device inside a test's Trio nursery, and attaching it to QEMU.

These are the context managers behind the pytest fixtures; a test that
wants a device's lifetime to end before the test does uses them directly.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Collection, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, Protocol, TypeVar

import trio

from vdev.model.device import Device
from vdev.runtime.context import DeviceContext

if TYPE_CHECKING:
    from vdev.client import Client
    from vdev.guest import GuestOutcome
    from vdev.libvfio_user import Library
    from vdev.qemu import PciFunction, QemuMachine
    from vdev.testing.bench import Bench

__all__ = [
    "ALL_COMMAND_BITS",
    "AttachQemu",
    "BootGuest",
    "CommandBit",
    "ConnectClient",
    "OpenBench",
    "QemuAttached",
    "ServeDevice",
    "qemu_attached",
    "served",
    "vfio_user_pci",
]

D = TypeVar("D", bound=Device)

#: A COMMAND bit :func:`qemu_attached` (and ``vdev_qemu``) can turn on.
CommandBit = Literal["memory", "io", "master"]
ALL_COMMAND_BITS: tuple[CommandBit, ...] = ("memory", "io", "master")


def vfio_user_pci(socket_path: Path, **properties: object) -> dict[str, object]:
    """A QEMU ``-device`` spec attaching the vfio-user device served on ``socket_path``."""
    return {"driver": "vfio-user-pci", "socket": {"type": "unix", "path": str(socket_path)}, **properties}


@asynccontextmanager
async def served(
    device: Device, socket_path: Path | int, *, library: Library | None = None
) -> AsyncIterator[DeviceContext]:
    """Serve ``device`` on ``socket_path`` for the duration of the ``async with`` block.

    ``socket_path`` may also be the fd of a socket already listening (the
    context takes it over).  ``library`` is the libvfio-user to serve with,
    by default the one vdev loads.  The socket exists when the block starts;
    on exit the server task is cancelled, the context destroyed and the
    socket removed.  The device's event log keeps every trapped access
    too (``keep_accesses``), since tests read it afterwards.
    """
    async with trio.open_nursery() as nursery:
        device.events.keep_accesses = True
        context = DeviceContext(device, socket_path, library)
        await nursery.start(context.serve)
        try:
            yield context
        finally:
            nursery.cancel_scope.cancel()


class QemuAttached(NamedTuple):
    """A QEMU machine with a served device attached, and the device as QEMU's PCI code sees it.

    ``vm`` is the :class:`~vdev.qemu.QemuMachine` (qtest, QMP, guest
    memory; ``await attached.vm.quit()`` ends this client early, the device
    keeps being served), ``function`` the :class:`~vdev.qemu.PciFunction`:
    ``vm, function = await vdev_qemu(device)``.
    """

    vm: QemuMachine
    function: PciFunction


@asynccontextmanager
async def qemu_attached(
    context: DeviceContext,
    *,
    enable: Collection[CommandBit] = ALL_COMMAND_BITS,
    properties: Mapping[str, object] | None = None,
    **machine_options: Any,
) -> AsyncIterator[QemuAttached]:
    """QEMU in qtest mode with the device ``context`` serves attached, ready for register access.

    The device is found on the PCI bus, its BARs are placed, and exactly
    the COMMAND bits named in ``enable`` are turned on (all of them by
    default; ``()`` for none).  ``properties`` go on the ``vfio-user-pci``
    device (``addr``, ``x-msg-timeout``…), ``machine_options`` to
    :class:`~vdev.qemu.QemuMachine` (``machine``, ``shared_memory``…).
    """
    from vdev.qemu import QemuMachine

    unknown = set(enable) - set(ALL_COMMAND_BITS)
    if unknown:
        raise ValueError(f"enable: unknown COMMAND bits {sorted(unknown)}; choose from {list(ALL_COMMAND_BITS)}")
    device = context.device
    spec = vfio_user_pci(context.socket_path, **(properties or {}))
    async with QemuMachine(devices=[spec], **machine_options) as vm:
        function = await (await vm.pci_bus()).find(device.vendor_id, device.device_id)
        await function.map_bars()
        await function.enable(memory="memory" in enable, io="io" in enable, master="master" in enable)
        yield QemuAttached(vm, function)


class ServeDevice(Protocol):
    """The ``vdev_serve`` fixture: ``await vdev_serve(device)`` serves it until the test ends."""

    def __call__(self, device: Device) -> Awaitable[DeviceContext]: ...


class ConnectClient(Protocol):
    """The ``vdev_client`` fixture: ``await vdev_client(device)`` serves it and connects a client."""

    def __call__(self, device: Device) -> Awaitable[Client]: ...


class OpenBench(Protocol):
    """The ``vdev_bench`` fixture: ``await vdev_bench(device)`` puts it on the bench until the test ends."""

    def __call__(self, device: D, *, wired: bool = True) -> Awaitable[Bench[D]]: ...


class AttachQemu(Protocol):
    """The ``vdev_qemu`` fixture: ``await vdev_qemu(device, enable=…)``, arguments as :func:`qemu_attached`."""

    def __call__(
        self,
        device: Device,
        *,
        enable: Collection[CommandBit] = ALL_COMMAND_BITS,
        properties: Mapping[str, object] | None = None,
        **machine_options: Any,
    ) -> Awaitable[QemuAttached]: ...


class BootGuest(Protocol):
    """The ``vdev_guest`` fixture: ``await vdev_guest(command, devices=…)``, as :func:`vdev.guest.run_guest`."""

    def __call__(self, command: str | None = None, **options: Any) -> Awaitable[GuestOutcome]: ...
