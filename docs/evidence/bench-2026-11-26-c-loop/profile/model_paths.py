import sys, time, trio
sys.path.insert(0, ".")
from bench.devices import AsyncCounter, SyncCounter
async def main():
    for cls in (SyncCounter, AsyncCounter):
        d = cls()
        d.config.data[4] |= 1  # IO enable
        N = 20000
        t0 = time.perf_counter()
        for _ in range(N):
            await d.region_read(2, 0, 4)
        t1 = time.perf_counter()
        print(cls.__name__, "region_read %.2f us" % ((t1 - t0) / N * 1e6))
        if cls is SyncCounter:
            t0 = time.perf_counter()
            for _ in range(N):
                d.quick_read(2, 0, 4)
            print("quick_read %.2f us" % ((time.perf_counter() - t0) / N * 1e6))
trio.run(main)
