"""Serving several devices from one process: one Trio loop, one serving thread per device.

Each device gets its own :class:`~vdev.runtime.context.DeviceContext` task
and serving thread.  What fails inside one device stays there, because one
broken device must not take down the rest:

* a handler that raises fails only that access (an error reply, a
  :class:`~vdev.model.events.HandlerError` event), and the device goes on;
* a device whose serving fails once it is running (its serving thread
  died: an event listener that raised on a connect, say) is logged, its
  socket removed, and the other devices go on being served; only when the
  last device stops does :func:`serve` raise, so a server of one device
  (``vdev serve``) exits with that device's error.

Setup is all or nothing: every context is created before any is served, so
a bad socket path or a library refusal stops the server before it starts,
with nothing half-served.  SIGINT and SIGTERM end the server cleanly: every
context is destroyed and every socket removed.
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
    running = len(contexts)

    async def serve_alone(context: DeviceContext, *, task_status: trio.TaskStatus[None]) -> None:
        nonlocal running
        started = False
        try:
            async with trio.open_nursery() as own:
                await own.start(context.serve)
                started = True
                task_status.started()
        except Exception as exc:
            running -= 1
            if not started or not running:
                raise
            reason: BaseException = exc
            while isinstance(reason, BaseExceptionGroup) and len(reason.exceptions) == 1:
                reason = reason.exceptions[0]
            log.error("%s: stopped serving (%s); the other devices are still served", context.device.name, reason)

    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            if handle_signals:
                nursery.start_soon(_stop_on_signals, scope)
            for context in contexts:
                await nursery.start(serve_alone, context)
            task_status.started(contexts)
