"""Serving a device inside a test's Trio nursery."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from vdev.model.device import Device
from vdev.runtime.context import DeviceContext


def vfio_user_pci(socket_path: Path, **properties: object) -> dict[str, object]:
    """A QEMU ``-device`` spec attaching the vfio-user device served on ``socket_path``."""
    return {"driver": "vfio-user-pci", "socket": {"type": "unix", "path": str(socket_path)}, **properties}


@asynccontextmanager
async def served(device: Device, socket_path: Path) -> AsyncIterator[DeviceContext]:
    """Serve ``device`` on ``socket_path`` for the duration of the ``async with`` block.

    The socket exists when the block starts; on exit the server task is
    cancelled, the context destroyed and the socket removed.  The device's
    event log keeps every trapped access too (``keep_accesses``), since
    tests read it afterwards.
    """
    async with trio.open_nursery() as nursery:
        device.events.keep_accesses = True
        context = DeviceContext(device, socket_path)
        await nursery.start(context.serve)
        try:
            yield context
        finally:
            nursery.cancel_scope.cancel()
