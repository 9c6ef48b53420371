"""Run asyncio coroutines from Trio on an event loop that has a thread of its own.

QEMU's maintained QMP library, ``qemu.qmp``, is written for asyncio; vdev is
Trio.  Its synchronous ``legacy.QEMUMonitorProtocol`` inside
``trio.to_thread.run_sync`` looks simpler but is unsound for a harness:

* that wrapper runs its event loop only during a call, so QMP events are
  read only while some command is in flight;
* a call blocked in a worker thread cannot be cancelled: a Trio timeout would
  abandon the thread still running the loop, and the next call would find
  the loop busy.

So the client lives on one asyncio loop that runs in a daemon thread for the
client's whole life.  It keeps reading (events queue up as they arrive), and
cancelling the Trio caller stops the asyncio task it is waiting for and
waits for that task to unwind.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import trio

T = TypeVar("T")

#: How long a cancelled call waits for its asyncio task to finish unwinding.
_CANCEL_GRACE = 5.0


class AsyncioThread:
    """An asyncio event loop running in a thread, callable from Trio."""

    def __init__(self, name: str) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._closed = False
        self._thread.start()

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    async def run(
        self,
        fn: Callable[..., Coroutine[Any, Any, T]],
        *args: object,
        abort: Callable[[], None] | None = None,
    ) -> T:
        """Await ``fn(*args)`` as a task on the asyncio loop and return its result.

        When the Trio caller is cancelled, the task is stopped and the call
        returns only once the task has unwound (at most :data:`_CANCEL_GRACE`
        per step), so cleanup such as closing a half-open connection is over.
        The task is cancelled, unless ``abort`` is given: then ``abort()`` is
        called first, from the Trio thread, to make the task fail on its own
        (shutting down its socket, say) - for libraries that do not clean up
        properly when cancelled mid-way.

        Raises :class:`trio.ClosedResourceError` if the thread is closed
        before or while the task runs.
        """
        if self._closed:
            raise trio.ClosedResourceError("the asyncio thread is closed")
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        tasks: list[asyncio.Task[T]] = []

        def notify(_: asyncio.Task[T]) -> None:
            try:
                token.run_sync_soon(done.set)
            except trio.RunFinishedError:
                pass

        def start() -> None:
            task = self._loop.create_task(fn(*args))
            task.add_done_callback(notify)
            tasks.append(task)

        def cancel() -> None:
            tasks[0].cancel()

        # Both callbacks run in order on the loop, so the task exists by the
        # time ``cancel`` runs.
        self._loop.call_soon_threadsafe(start)
        try:
            await done.wait()
        except BaseException:
            with trio.CancelScope(shield=True):
                if abort is not None:
                    abort()
                    with trio.move_on_after(_CANCEL_GRACE):
                        await done.wait()
                if not done.is_set():
                    self._loop.call_soon_threadsafe(cancel)
                    with trio.move_on_after(_CANCEL_GRACE):
                        await done.wait()
            raise
        task = tasks[0]
        if task.cancelled():
            raise trio.ClosedResourceError("the asyncio thread was closed meanwhile")
        return task.result()

    async def aclose(self) -> None:
        """Cancel what still runs on the loop, stop it and join its thread."""
        if self._closed:
            return
        await self.run(_cancel_other_tasks)
        self._closed = True
        self._loop.call_soon_threadsafe(self._loop.stop)
        await trio.to_thread.run_sync(self._thread.join)
        self._loop.close()


async def _cancel_other_tasks() -> None:
    current = asyncio.current_task()
    tasks = [task for task in asyncio.all_tasks() if task is not current]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
