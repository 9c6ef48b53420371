"""pytest fixtures for testing vdev devices (registered via the ``pytest11`` entry point).

Any project with vdev installed gets these fixtures; its tests run under
pytest-trio (``trio_mode = true``, or ``@pytest.mark.trio``).

``vdev_socket_dir``
    A fresh directory with a short path for vfio-user sockets (UNIX socket
    paths are limited to 107 bytes, which pytest's ``tmp_path`` can exceed).

``vdev_serve``
    ``await vdev_serve(device)`` serves a device until the test ends and
    returns its :class:`~vdev.runtime.DeviceContext` (``.socket_path`` is
    where clients connect).

``vdev_client``
    ``await vdev_client(device)`` serves the device and returns a connected,
    negotiated :class:`vdev.client.Client`; both end with the test.

``vdev_qemu``
    ``await vdev_qemu(device)`` serves the device, starts QEMU in qtest mode
    with it attached over vfio-user, finds it on the PCI bus, places its
    BARs and enables memory, I/O and bus mastering.  Returns a
    :class:`QemuAttached` with ``.vm`` (the :class:`~vdev.qemu.QemuMachine`)
    and ``.function`` (the :class:`~vdev.qemu.PciFunction`).  QEMU is always
    stopped at the end, and its stderr is shown if the test failed.
"""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio

from vdev.model.device import Device
from vdev.runtime.context import DeviceContext
from vdev.testing.serving import QemuAttached, served, vfio_user_pci

T = TypeVar("T")


@pytest.fixture
def vdev_socket_dir() -> Iterator[Path]:
    """A fresh directory with a short path, removed after the test."""
    with tempfile.TemporaryDirectory(prefix="vdev-") as directory:
        yield Path(directory)


async def _hold(manager: AbstractAsyncContextManager[T], *, task_status: trio.TaskStatus[T]) -> None:
    """Enter ``manager`` in a task of the fixture's nursery and keep it open until the test ends.

    Context managers that open nurseries must be exited by the task that
    entered them, so they cannot be entered by the test and exited by the
    fixture; this task does both.
    """
    async with manager as value:
        task_status.started(value)
        await trio.sleep_forever()


@pytest.fixture
async def vdev_serve(vdev_socket_dir: Path) -> AsyncIterator[Callable[[Device], Awaitable[DeviceContext]]]:
    """Factory serving devices for the rest of the test."""
    async with trio.open_nursery() as nursery:

        async def serve(device: Device) -> DeviceContext:
            path = vdev_socket_dir / f"{device.name}.sock"
            context: DeviceContext = await nursery.start(_hold, served(device, path))
            return context

        yield serve
        nursery.cancel_scope.cancel()


@pytest.fixture
async def vdev_client(vdev_serve: Callable[[Device], Awaitable[DeviceContext]]) -> AsyncIterator[Any]:
    """Factory serving a device and returning a connected vfio-user client for it."""
    from vdev.client import Client

    async with trio.open_nursery() as nursery:

        async def connect(device: Device) -> Client:
            context = await vdev_serve(device)
            client: Client = await nursery.start(_hold, Client.connect(context.socket_path))
            return client

        yield connect
        nursery.cancel_scope.cancel()


@pytest.fixture
async def vdev_qemu(
    vdev_serve: Callable[[Device], Awaitable[DeviceContext]],
) -> AsyncIterator[Callable[..., Awaitable[QemuAttached]]]:
    """Factory attaching a served device to QEMU in qtest mode, ready for register access."""
    from vdev.qemu import QemuMachine

    async with trio.open_nursery() as nursery:

        async def attach(device: Device, **machine_options: Any) -> QemuAttached:
            context = await vdev_serve(device)
            machine = QemuMachine(devices=[vfio_user_pci(context.socket_path)], **machine_options)
            vm = await nursery.start(_hold, machine)
            function = await (await vm.pci_bus()).find(device.vendor_id, device.device_id)
            await function.map_bars()
            await function.enable(memory=True, io=True, master=True)
            return QemuAttached(vm, function)

        yield attach
        nursery.cancel_scope.cancel()
