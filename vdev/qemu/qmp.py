"""QEMU's machine protocol (QMP) from Trio, through the maintained ``qemu.qmp`` library.

``qemu.qmp`` speaks asyncio, so the client runs on an asyncio loop in a thread
of its own (see :mod:`vdev.qemu._asyncio_thread` for why that, and not the
library's synchronous wrapper in a worker thread).  Every public method here
is a Trio coroutine; cancelling it cancels the QMP call.

The methods beyond :meth:`QmpClient.execute` exist because each hides a
pitfall: ``system_reset`` and ``device_del`` return before the reset or the
removal happened, so their wrappers wait for QEMU's event; ``query-pci``
nests devices behind bridges, so :meth:`QmpClient.query_pci` flattens them.
"""

from __future__ import annotations

import asyncio
import importlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Mapping
from contextlib import asynccontextmanager
from types import ModuleType
from typing import TYPE_CHECKING, Any, TypeVar

import trio

from vdev.qemu._asyncio_thread import AsyncioThread
from vdev.qemu.errors import QemuError, QmpClosedError, QmpCommandError

if TYPE_CHECKING:
    from qemu.qmp import EventListener, QMPClient

#: How long closing may wait for QEMU to acknowledge the disconnection.
_CLOSE_TIMEOUT = 2.0


def _library() -> ModuleType:
    """``qemu.qmp``, imported when a machine first needs it, so ``import vdev.qemu`` works without it."""
    try:
        return importlib.import_module("qemu.qmp")
    except ImportError as exc:
        raise QemuError(
            f"QEMU machines speak QMP through the qemu.qmp package, which is missing ({exc});"
            " install vdev with its qemu (or test) extra: pip install 'vdev[qemu]'"
        ) from None


T = TypeVar("T")

#: A QMP event or ``query-*`` record: plain JSON data.
QmpObject = dict[str, Any]


class QmpEvents:
    """Events of the names given to :meth:`QmpClient.events`, in arrival order."""

    def __init__(self, client: QmpClient, listener: EventListener) -> None:
        self._client = client
        self._listener = listener

    async def get(self) -> QmpObject:
        """The next event (``{"event": ..., "data": ..., "timestamp": ...}``)."""
        return await self._client._call(self._client._next_event, self._listener)

    async def wait_for(self, predicate: Callable[[QmpObject], bool]) -> QmpObject:
        """Skip events until one satisfies ``predicate``; return it."""
        while True:
            event = await self.get()
            if predicate(event):
                return event


class QmpClient:
    """A QMP session with one QEMU; create it with :meth:`connect`."""

    def __init__(self, loop: AsyncioThread, client: QMPClient) -> None:
        self._loop = loop
        self._client = client
        self._closed = False

    @staticmethod
    def check_library() -> None:
        """Raise :class:`~vdev.qemu.errors.QemuError` saying what to install when ``qemu.qmp`` is missing."""
        _library()

    @classmethod
    async def connect(cls, sock: socket.socket) -> QmpClient:
        """Take over a socket connected to QEMU's QMP monitor and negotiate."""
        _library()
        loop = AsyncioThread("vdev-qmp")
        try:
            # qemu.qmp leaves its transport open when cancelled mid-negotiation
            # but cleans up after a connection error, so stop it with one.
            client = await loop.run(_connect, sock, abort=lambda: _hang_up(sock))
        except BaseException:
            with trio.CancelScope(shield=True):
                await loop.aclose()
            raise
        return cls(loop, client)

    async def aclose(self) -> None:
        """Disconnect and stop the asyncio thread; safe to call twice, even when cancelled."""
        if self._closed:
            return
        self._closed = True
        with trio.CancelScope(shield=True):
            with trio.move_on_after(_CLOSE_TIMEOUT):
                await self._loop.run(self._disconnect)
            await self._loop.aclose()

    async def execute(self, command: str, arguments: Mapping[str, object] | None = None) -> Any:
        """Run one QMP command and return its ``return`` value."""
        return await self._call(self._execute, command, arguments)

    @asynccontextmanager
    async def events(self, *names: str) -> AsyncIterator[QmpEvents]:
        """Collect events with these names (all events if none) while the block runs.

        Enter it *before* the command that causes the event, so the event
        cannot slip by between the command and the wait.
        """
        listener = await self._call(self._listen, names)
        try:
            yield QmpEvents(self, listener)
        finally:
            if not self._closed:
                with trio.CancelScope(shield=True):
                    await self._call(self._unlisten, listener)

    async def system_reset(self) -> None:
        """Reset the machine and return once QEMU reports the ``RESET`` done."""
        async with self.events("RESET") as events:
            await self.execute("system_reset")
            await events.get()

    async def device_add(self, **props: object) -> None:
        """Add a device: ``device_add(driver="edu", id="edu1", addr="0x5")``."""
        await self.execute("device_add", props)

    async def device_del(
        self,
        device_id: str,
        *,
        acknowledge: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Request removal of a device and wait for QEMU's ``DEVICE_DELETED``.

        Hot-pluggable PCI devices are only removed once the guest agrees; a
        qtest machine has no guest, so pass the guest's part as
        ``acknowledge``, which runs after the request.  :func:`vdev.qemu.hot_unplug`
        does that for ACPI PCI hotplug.
        """
        async with self.events("DEVICE_DELETED") as events:
            await self.execute("device_del", {"id": device_id})
            if acknowledge is not None:
                await acknowledge()
            await events.wait_for(lambda event: event.get("data", {}).get("device") == device_id)

    async def query_pci(self) -> list[QmpObject]:
        """Every PCI function QEMU has, behind bridges too, as ``query-pci`` describes it."""
        buses = await self.execute("query-pci")
        return list(_walk_pci(device for bus in buses for device in bus["devices"]))

    async def qom_get(self, path: str, prop: str) -> Any:
        """Read property ``prop`` of the QOM object at ``path``."""
        return await self.execute("qom-get", {"path": path, "property": prop})

    async def qom_list(self, path: str) -> list[str]:
        """The names of the properties and children of the QOM object at ``path``."""
        entries = await self.execute("qom-list", {"path": path})
        return [entry["name"] for entry in entries]

    async def _call(self, fn: Callable[..., Coroutine[Any, Any, T]], *args: object) -> T:
        """Run ``fn(*args)`` on the client's loop, reporting a closed loop as QMP closed."""
        try:
            return await self._loop.run(fn, *args)
        except trio.ClosedResourceError:
            raise QmpClosedError("the QMP client was closed") from None

    # -- coroutines that run on the asyncio loop --------------------------------

    async def _execute(self, command: str, arguments: Mapping[str, object] | None) -> Any:
        qmp = _library()
        try:
            return await self._client.execute(command, arguments)
        except qmp.ExecuteError as exc:
            raise QmpCommandError(command, exc.error_class, str(exc)) from None
        except (qmp.ExecInterruptedError, qmp.StateError) as exc:
            raise QmpClosedError(f"the QMP connection was lost during {command!r}") from exc

    async def _listen(self, names: tuple[str, ...]) -> EventListener:
        listener: EventListener = _library().EventListener(names or None)
        self._client.register_listener(listener)
        return listener

    async def _unlisten(self, listener: EventListener) -> None:
        self._client.remove_listener(listener)

    async def _next_event(self, listener: EventListener) -> QmpObject:
        event = asyncio.ensure_future(listener.get())
        lost = asyncio.ensure_future(self._until_disconnected())
        try:
            await asyncio.wait((event, lost), return_when=asyncio.FIRST_COMPLETED)
        finally:
            event.cancel()
            lost.cancel()
        if event.done() and not event.cancelled():
            return dict(event.result())
        raise QmpClosedError("the QMP connection was lost while waiting for an event")

    async def _until_disconnected(self) -> None:
        running = _library().Runstate.RUNNING
        while self._client.runstate == running:
            await self._client.runstate_changed()

    async def _disconnect(self) -> None:
        # disconnect() re-raises whatever ended the session early (EOFError
        # when QEMU went away first); when closing, that is no news.
        try:
            await self._client.disconnect()
        except (_library().QMPError, OSError, EOFError):
            pass


async def _connect(sock: socket.socket) -> QMPClient:
    qmp = _library()
    client: QMPClient = qmp.QMPClient("vdev")
    try:
        await client.connect(sock)
    except qmp.ConnectError as exc:
        raise QmpClosedError(f"QMP negotiation with QEMU failed: {exc}") from exc
    return client


def _hang_up(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed by the failed session


def _walk_pci(devices: Iterable[QmpObject]) -> Iterable[QmpObject]:
    for device in devices:
        yield device
        bridge = device.get("pci_bridge")
        if bridge is not None:
            yield from _walk_pci(bridge.get("devices", ()))
