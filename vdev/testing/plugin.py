"""pytest fixtures for testing vdev devices (registered via the ``pytest11`` entry point).

Any project with vdev installed gets these fixtures; its tests run under
pytest-trio (``trio_mode = true``, or ``@pytest.mark.trio``).  Each factory
fixture has a type in :mod:`vdev.testing` to annotate the argument with.

``vdev_bench`` (:class:`~vdev.testing.OpenBench`)
    ``await vdev_bench(device)`` puts a device on the in-process
    :class:`~vdev.testing.Bench` until the test ends: no socket, no
    libvfio-user.

``vdev_scripted_server`` (:class:`~vdev.testing.ScriptedServer`)
    A scripted vfio-user server listening at ``.path``, for testing
    clients; ``await vdev_scripted_server.accept()`` gives each connection.

``vdev_socket_dir``
    A fresh directory with a short path for vfio-user sockets (UNIX socket
    paths are limited to 107 bytes, which pytest's ``tmp_path`` can exceed).

``vdev_serve`` (:class:`~vdev.testing.ServeDevice`)
    ``await vdev_serve(device)`` serves a device until the test ends and
    returns its :class:`~vdev.runtime.DeviceContext` (``.socket_path`` is
    where clients connect).  Serving the same device again returns the
    same context.

``vdev_client`` (:class:`~vdev.testing.ConnectClient`)
    ``await vdev_client(device)`` serves the device and returns a connected,
    negotiated :class:`vdev.client.Client`; both end with the test.

``vdev_qemu`` (:class:`~vdev.testing.AttachQemu`)
    ``await vdev_qemu(device, enable={"memory"})`` serves the device, starts
    QEMU in qtest mode with it attached over vfio-user, finds it on the PCI
    bus, places its BARs and turns on the COMMAND bits in ``enable`` (by
    default memory, I/O and bus mastering).  Returns a
    :class:`~vdev.testing.QemuAttached` with ``.vm`` (the
    :class:`~vdev.qemu.QemuMachine`) and ``.function`` (the
    :class:`~vdev.qemu.PciFunction`); the other arguments are those of
    :func:`~vdev.testing.qemu_attached`.  QEMU is always stopped at the
    end, and its stderr is added to the report of a failed test.

``vdev_guest`` (:class:`~vdev.testing.BootGuest`)
    ``await vdev_guest("cat /proc/cmdline", devices=[Hello()], vfio=True)``
    boots a Linux guest with the devices attached, runs the command in it
    and returns a :class:`~vdev.guest.GuestOutcome` (``.status``,
    ``.output``, ``.kernel_error``, ``.console_log``); the keyword
    arguments are :func:`vdev.guest.run_guest`'s.  The kernel is
    ``$VDEV_GUEST_KERNEL`` (a set name or a path) unless given, ``bookworm``
    by default; each guest's logs stay under the test's ``tmp_path``.
"""

from __future__ import annotations

import itertools
import os
import tempfile
from collections.abc import AsyncIterator, Collection, Generator, Iterator, Mapping
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio

from vdev.model.device import Device
from vdev.runtime.context import DeviceContext
from vdev.testing.bench import Bench, open_bench
from vdev.testing.peer import ScriptedServer, open_scripted_server
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
)

T = TypeVar("T")
D = TypeVar("D", bound=Device)

#: The QEMU machines a test attached, so a failed test's report can show their stderr.
_MACHINES = pytest.StashKey[list[Any]]()


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
async def vdev_bench() -> AsyncIterator[OpenBench]:
    """Factory putting devices on the in-process bench for the rest of the test."""
    async with trio.open_nursery() as nursery:

        async def put_on_bench(device: D, *, wired: bool = True) -> Bench[D]:
            bench: Bench[D] = await nursery.start(_hold, open_bench(device, wired=wired))
            return bench

        yield put_on_bench
        nursery.cancel_scope.cancel()


@pytest.fixture
async def vdev_scripted_server() -> AsyncIterator[ScriptedServer]:
    """A scripted vfio-user server on a fresh socket, for testing a client."""
    async with open_scripted_server() as server:
        yield server


@pytest.fixture
async def vdev_serve(vdev_socket_dir: Path) -> AsyncIterator[ServeDevice]:
    """Factory serving devices for the rest of the test."""
    contexts: dict[Device, DeviceContext] = {}
    async with trio.open_nursery() as nursery:

        async def serve(device: Device) -> DeviceContext:
            if device not in contexts:
                path = vdev_socket_dir / f"{device.name}-{len(contexts)}.sock"
                contexts[device] = await nursery.start(_hold, served(device, path))
            return contexts[device]

        yield serve
        nursery.cancel_scope.cancel()


@pytest.fixture
async def vdev_client(vdev_serve: ServeDevice) -> AsyncIterator[ConnectClient]:
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
async def vdev_qemu(vdev_serve: ServeDevice, request: pytest.FixtureRequest) -> AsyncIterator[AttachQemu]:
    """Factory attaching a served device to QEMU in qtest mode, ready for register access."""
    machines = request.node.stash.setdefault(_MACHINES, [])
    async with trio.open_nursery() as nursery:

        async def attach(
            device: Device,
            *,
            enable: Collection[CommandBit] = ALL_COMMAND_BITS,
            properties: Mapping[str, object] | None = None,
            **machine_options: Any,
        ) -> QemuAttached:
            context = await vdev_serve(device)
            manager = qemu_attached(context, enable=enable, properties=properties, **machine_options)
            attached: QemuAttached = await nursery.start(_hold, manager)
            machines.append(attached.vm)
            return attached

        yield attach
        nursery.cancel_scope.cancel()


@pytest.fixture
def vdev_guest(tmp_path: Path) -> BootGuest:
    """Factory booting a guest per call: ``await vdev_guest(command, **run_guest_options)``."""
    from vdev.guest import GuestOutcome, run_guest
    from vdev.qemu.guest import DEFAULT_GUEST

    boots = itertools.count(1)

    async def boot(command: str | None = None, **options: Any) -> GuestOutcome:
        options.setdefault("kernel", os.environ.get("VDEV_GUEST_KERNEL", DEFAULT_GUEST))
        options.setdefault("workdir", tmp_path / f"guest-{next(boots)}")
        return await run_guest(command=command, **options)

    return boot


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, Any]:
    """Add the stderr of every QEMU a failed test attached (they are still running at this point)."""
    report = yield
    if report.when == "call" and report.failed:
        for vm in item.stash.get(_MACHINES, []):
            report.sections.append((f"QEMU stderr (pid {vm.pid})", vm.stderr_tail() or "(nothing)"))
    return report
