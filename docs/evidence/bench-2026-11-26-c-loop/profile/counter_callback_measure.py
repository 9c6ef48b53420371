"""Scratch: the C sample, vdev plain and vdev with a C callback (no Python per access). Args: client CPU, server CPU, rounds."""
import os, sys, tempfile, time, statistics, subprocess
from pathlib import Path
sys.path.insert(0, ".")
from bench.common import REPO
from bench.trapped import SERVERS, PLAIN, C_SAMPLE, _measure, _pin_process
HERE = "docs/evidence/bench-2026-11-26-c-loop/profile"
variants = {
    "C sample": SERVERS[C_SAMPLE],
    "vdev plain": SERVERS[PLAIN],
    "vdev, C callback": lambda s: [sys.executable, f"{HERE}/counter_callback_server.py", str(s)],
}
client, server, rounds = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
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
    print(f"{k:20s} {statistics.median(res[k]):8.0f} reads/s  ratio {statistics.median(res[k])/base:.2f}  cpu {statistics.median(cpu[k]):.1f} us")
