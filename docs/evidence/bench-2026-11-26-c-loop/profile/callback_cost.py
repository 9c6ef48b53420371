import ctypes, time, sys
sys.path.insert(0, ".")
from bench.devices import SyncCounter
from vdev.runtime.context import DeviceContext
d = SyncCounter(); d.config.data[4] |= 1
ctx = DeviceContext(d, "/tmp/x.sock")
access = ctx._region_callback(2)
buf = ctypes.create_string_buffer(8); addr = ctypes.addressof(buf)
N = 200000
t0 = time.perf_counter()
for _ in range(N): access(0, addr, 4, 0, False)
t1 = time.perf_counter()
print("access() python-side %.2f us" % ((t1 - t0) / N * 1e6))
cb = ctypes.CFUNCTYPE(ctypes.c_ssize_t, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int64, ctypes.c_bool)(access)
# call the callback through C: via a ctypes function pointer cast (goes C -> python)
fp = ctypes.cast(cb, ctypes.CFUNCTYPE(ctypes.c_ssize_t, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int64, ctypes.c_bool))
t0 = time.perf_counter()
for _ in range(N): fp(None, addr, 4, 0, False)
t1 = time.perf_counter()
print("through ctypes out+in %.2f us" % ((t1 - t0) / N * 1e6))
t0 = time.perf_counter()
for _ in range(N): ctypes.memmove(addr, b"abcd", 4)
print("memmove %.2f us" % ((time.perf_counter() - t0) / N * 1e6))
t0 = time.perf_counter()
for _ in range(N): d.quick_read(2, 0, 4)
print("quick_read %.2f us" % ((time.perf_counter() - t0) / N * 1e6))
