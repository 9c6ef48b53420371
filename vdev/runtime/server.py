"""Serving several devices from one process: one Trio loop, one serving thread per device.

Each device gets its own :class:`~vdev.runtime.context.DeviceContext` task
(and thread);
a device whose setup fails is reported and the others keep running, because
one broken device must not take down the rest.  SIGINT and SIGTERM end the
server cleanly: every context is destroyed and every socket removed.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Sequence
from pathlib import Path

import trio

from vdev.model.device import Device
from vdev.runtime.context import DeviceContext

log = logging.getLogger("vdev")


async def _stop_on_signals(cancel_scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("received %s, shutting down", signal.Signals(signum).name)
            cancel_scope.cancel()
            return


async def serve(
    devices: Sequence[tuple[Device, Path | int]],
    *,
    task_status: trio.TaskStatus[list[DeviceContext]] = trio.TASK_STATUS_IGNORED,
    handle_signals: bool = True,
    allowed_uids: frozenset[int] | None = None,
) -> None:
    """Serve every ``(device, socket)`` pair until cancelled or signalled.

    ``socket`` is a path to listen on, or the fd of an inherited listening
    socket.  Every context is created before serving starts, so a bad socket
    or a library refusal is raised here as a plain :class:`ServeError` (or
    :class:`~vdev.libvfio_user.LibraryError`).
    """
    contexts = [DeviceContext(device, where, allowed_uids=allowed_uids) for device, where in devices]
    try:
        for context in contexts:
            context.create()
    except BaseException:
        for context in contexts:
            context.destroy()
        raise
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            if handle_signals:
                nursery.start_soon(_stop_on_signals, scope)
            for context in contexts:
                await nursery.start(context.serve)
            task_status.started(contexts)
