"""The floor under an ``async`` handler's access: one hand-over from a thread to Trio and back.

vdev runs an ``async`` handler in Trio, because only there can it await;
the serving thread that received the message waits meanwhile.  This
program measures that hand-over alone, with nothing else in it: a thread
writes an eventfd and blocks on a second one, in one call into C with the
GIL released; a Trio task asleep in ``wait_readable`` on the first wakes,
reads it and writes the second (from C too).  It is the mechanism vdev's
serving thread uses (:mod:`vdev.libvfio_user.serve_loop`), minus vdev, so
an ``async`` access can cost no less than this plus what a plain one costs.

``python -m bench.handover COUNT`` prints the process's CPU time per
hand-over in microseconds (all threads, user and system).
"""

from __future__ import annotations

import os
import resource
import sys

import trio

from vdev.libvfio_user import serve_loop


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def measure(count: int) -> float:
    """CPU µs per hand-over, over ``count`` of them after a warm-up."""
    loop = serve_loop.load()
    wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    done = os.eventfd(0, os.EFD_CLOEXEC)
    spent: list[float] = []

    async def trio_side() -> None:
        while True:
            await trio.lowlevel.wait_readable(wake)
            os.eventfd_read(wake)
            loop.wake(done)

    def thread_side() -> None:
        for _ in range(count // 10):  # warm-up
            loop.wake_and_wait(wake, done)
        before = _cpu_seconds()
        for _ in range(count):
            loop.wake_and_wait(wake, done)
        spent.append(_cpu_seconds() - before)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio_side)
        await trio.to_thread.run_sync(thread_side)
        nursery.cancel_scope.cancel()
    os.close(wake)
    os.close(done)
    return spent[0] / count * 1e6


if __name__ == "__main__":
    print(f"{trio.run(measure, int(sys.argv[1])):.3f}")
