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
cancelling the Trio caller cancels the asyncio task it is waiting for.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import trio

T = TypeVar("T")


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

    async def run(self, fn: Callable[..., Coroutine[Any, Any, T]], *args: object) -> T:
        """Await ``fn(*args)`` on the asyncio loop; cancelling the caller cancels it.

        Raises :class:`trio.ClosedResourceError` if the thread is closed
        before or while the coroutine runs.
        """
        if self._closed:
            raise trio.ClosedResourceError("the asyncio thread is closed")
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()

        def wake(_: concurrent.futures.Future[T]) -> None:
            try:
                token.run_sync_soon(done.set)
            except trio.RunFinishedError:
                pass

        future = asyncio.run_coroutine_threadsafe(fn(*args), self._loop)
        future.add_done_callback(wake)
        try:
            await done.wait()
        except BaseException:
            future.cancel()
            raise
        try:
            return future.result()
        except concurrent.futures.CancelledError:
            raise trio.ClosedResourceError("the asyncio thread was closed meanwhile") from None

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
