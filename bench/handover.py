"""The floor under an ``async`` handler's access: one hand-over from a thread to Trio and back.

vdev runs an ``async`` handler in Trio, because only there can it await;
the serving thread that received the message waits meanwhile.  This
program measures that hand-over alone, with nothing else in it: a thread
writes an eventfd and blocks on a lock; a Trio task asleep in
``wait_readable`` on the eventfd wakes, reads it and releases the lock.  It
is the mechanism vdev's serving thread uses, minus vdev, so an ``async``
access can cost no less than this plus what a plain one costs.

``python -m bench.handover COUNT`` prints the process's CPU time per
hand-over in microseconds (all threads, user and system).
"""

from __future__ import annotations

import os
import resource
import sys
import threading

import trio


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def measure(count: int) -> float:
    """CPU µs per hand-over, over ``count`` of them after a warm-up."""
    wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    done = threading.Lock()
    done.acquire()
    spent: list[float] = []

    async def trio_side() -> None:
        while True:
            await trio.lowlevel.wait_readable(wake)
            os.eventfd_read(wake)
            done.release()

    def thread_side() -> None:
        for _ in range(count // 10):  # warm-up
            os.eventfd_write(wake, 1)
            done.acquire()
        before = _cpu_seconds()
        for _ in range(count):
            os.eventfd_write(wake, 1)
            done.acquire()
        spent.append(_cpu_seconds() - before)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio_side)
        await trio.to_thread.run_sync(thread_side)
        nursery.cancel_scope.cancel()
    os.close(wake)
    return spent[0] / count * 1e6


if __name__ == "__main__":
    print(f"{trio.run(measure, int(sys.argv[1])):.3f}")
