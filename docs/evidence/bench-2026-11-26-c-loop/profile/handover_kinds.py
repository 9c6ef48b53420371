"""Floor of a thread -> Trio -> thread hand-over, pinned to one core."""
import os, threading, time, sys
import trio
os.sched_setaffinity(0, {1})
N = 20000

def threads_only():
    a, b = threading.Lock(), threading.Lock(); a.acquire(); b.acquire()
    def other():
        for _ in range(N):
            a.acquire(); b.release()
    t = threading.Thread(target=other); t.start()
    t0 = time.perf_counter()
    for _ in range(N):
        a.release(); b.acquire()
    t.join()
    return (time.perf_counter() - t0) / N * 1e6

async def eventfd_hop():
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    done = threading.Lock(); done.acquire()
    result = []
    async def job():
        while True:
            await trio.lowlevel.wait_readable(fd)
            os.eventfd_read(fd)
            done.release()
    def client():
        t0 = time.perf_counter()
        for _ in range(N):
            os.eventfd_write(fd, 1); done.acquire()
        result.append((time.perf_counter() - t0) / N * 1e6)
    async with trio.open_nursery() as n:
        n.start_soon(job)
        await trio.to_thread.run_sync(client)
        n.cancel_scope.cancel()
    return result[0]

async def token_hop():
    token = trio.lowlevel.current_trio_token()
    done = threading.Lock(); done.acquire()
    result = []
    task_box = []
    async def job(task_status=trio.TASK_STATUS_IGNORED):
        task_box.append(trio.lowlevel.current_task())
        task_status.started()
        while True:
            await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.SUCCEEDED)
            done.release()
    def client():
        task = task_box[0]
        resched = trio.lowlevel.reschedule
        t0 = time.perf_counter()
        for _ in range(N):
            token.run_sync_soon(resched, task); done.acquire()
        result.append((time.perf_counter() - t0) / N * 1e6)
    async with trio.open_nursery() as n:
        await n.start(job)
        await trio.to_thread.run_sync(client)
        n.cancel_scope.cancel()
    return result[0]

print("threads only  %.1f us" % threads_only())
print("eventfd hop   %.1f us" % trio.run(eventfd_hop))
print("token hop     %.1f us" % trio.run(token_hop))
