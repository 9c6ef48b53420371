"""vdev serving SyncCounter with BAR2's callback replaced by a C function (no Python per access)."""
import ctypes, sys
sys.path.insert(0, ".")
import trio
from bench.devices import SyncCounter
from vdev.runtime import context
lib = ctypes.CDLL("docs/evidence/bench-2026-11-26-c-loop/profile/libcounter.so")
address = ctypes.cast(lib.counter_cb, ctypes.c_void_p).value
original = context.DeviceContext._region_callback
def patched(self, region):
    return address if region == 2 else original(self, region)
context.DeviceContext._region_callback = patched
async def main():
    ctx = context.DeviceContext(SyncCounter(), sys.argv[1])
    await ctx.serve()
trio.run(main)
