"""Scratch: reads/s and server CPU for C servers that wait for a message in different ways (see README.md).

Arguments: client CPU, server CPU, rounds.  Build first:
gcc -O2 -I.deps/libvfio-user/include -o HERE/wait_kinds HERE/wait_kinds.c .deps/libvfio-user/lib/libvfio-user.so.0 -pthread
"""
import os, sys, tempfile, time, statistics, subprocess
from pathlib import Path
sys.path.insert(0, ".")
from bench.common import REPO, server_process
from bench.trapped import SERVERS, PLAIN, C_SAMPLE, _measure, _pin_process
HERE = "docs/evidence/bench-2026-11-26-c-loop/profile"
variants = {
    "C sample": SERVERS[C_SAMPLE],
    "wait in recvmsg (blocking context)": lambda s: [f"{HERE}/wait_kinds", "block", str(s)],
    "wait in poll, one fd": lambda s: [f"{HERE}/wait_kinds", "poll1", str(s)],
    "wait in poll, two fds": lambda s: [f"{HERE}/wait_kinds", "poll2", str(s)],
    "wait in a MSG_PEEK recv": lambda s: [f"{HERE}/wait_kinds", "peek", str(s)],
    "the same, SO_RCVTIMEO set": lambda s: ["env", "RCVTIMEO=1", f"{HERE}/wait_kinds", "peek", str(s)],
    "vdev plain": SERVERS[PLAIN],
}
client, server = int(sys.argv[1]), int(sys.argv[2])
rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 5
res = {k: [] for k in variants}; cpu = {k: [] for k in variants}
with tempfile.TemporaryDirectory() as d:
    procs = {}
    for i, (k, argv) in enumerate(variants.items()):
        s = Path(d) / f"{i}.sock"
        p = subprocess.Popen(argv(s), cwd=REPO, stderr=subprocess.DEVNULL)
        while not s.exists(): time.sleep(0.05)
        procs[k] = (s, p)
    time.sleep(0.5)
    os.sched_setaffinity(0, {client})
    for r in range(rounds):
        for k, (s, p) in procs.items():
            _pin_process(p.pid, {server})
            rate, floor, c = _measure(s, p.pid, 5000)
            res[k].append(rate); cpu[k].append(c)
    for k, (s, p) in procs.items(): p.terminate(); p.wait()
base = statistics.median(res["C sample"])
for k in variants:
    print(f"{k:36s} {statistics.median(res[k]):8.0f} reads/s  ratio {statistics.median(res[k])/base:.2f}  cpu {statistics.median(cpu[k]):.1f} us")
