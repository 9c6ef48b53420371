"""In-process: the async access path without libvfio-user (callback called from a plain thread)."""
import ctypes, os, sys, threading, time
sys.path.insert(0, ".")
import trio
from bench.devices import AsyncCounter, SyncCounter
from vdev.runtime.context import DeviceContext
os.sched_setaffinity(0, {1})
N = 20000
async def main():
    d = AsyncCounter(); d.config.data[4] |= 1
    ctx = DeviceContext(d, "/tmp/asyncpath.sock")
    async with trio.open_nursery() as n:
        await n.start(ctx.serve)
        access = ctx._region_callback(2)
        buf = ctypes.create_string_buffer(8); addr = ctypes.addressof(buf)
        def serving():
            ctx._lock.acquire()   # as the C loop holds it
            for _ in range(N // 10): access(0, addr, 4, 0, False)
            t0 = time.perf_counter(); c0 = time.process_time()
            for _ in range(N): access(0, addr, 4, 0, False)
            wall = (time.perf_counter() - t0) / N * 1e6; cpu = (time.process_time() - c0) / N * 1e6
            ctx._lock.release()
            return wall, cpu
        wall, cpu = await trio.to_thread.run_sync(serving)
        print(f"async access via callback: {wall:.1f} us wall, {cpu:.1f} us cpu")
        n.cancel_scope.cancel()
trio.run(main)
