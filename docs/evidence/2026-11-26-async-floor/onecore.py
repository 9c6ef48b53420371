"""Scratch: server CPU per trapped read, one core, C sample vs vdev plain (interleaved)."""
import os, statistics, sys, tempfile, subprocess, time
from pathlib import Path
from contextlib import ExitStack
sys.path.insert(0, os.getcwd())
from bench.common import REPO, server_process, thread_cpu, cpu_seconds_since
from bench.trapped import SERVERS, C_SAMPLE, PLAIN, ASYNC, _measure, _pin_process
cpu = int(sys.argv[1]) if len(sys.argv) > 1 else 1
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 5
perf = os.environ.get("PERF")
res = {C_SAMPLE: [], PLAIN: [], ASYNC: []}
with tempfile.TemporaryDirectory() as d, ExitStack() as st:
    pids = {}
    for n, name in enumerate((C_SAMPLE, PLAIN, ASYNC)):
        s = Path(d) / f"s{n}.sock"
        pids[name] = (s, st.enter_context(server_process(SERVERS[name](s), s, cwd=REPO)).pid)
    os.sched_setaffinity(0, {cpu})
    for r in range(rounds):
        for name, (s, pid) in pids.items():
            _pin_process(pid, {cpu})
            p = None
            if perf and name == os.environ.get("WHO", PLAIN) and r == rounds - 1:
                p = subprocess.Popen(["perf", "record", "-g", "-o", perf, "-p", str(pid)], stderr=subprocess.DEVNULL)
                time.sleep(0.5)
            rate, floor, c = _measure(s, pid, 5000)
            if p: p.send_signal(2); p.wait()
            res[name].append(c)
for k, v in res.items():
    print(f"{k}: median {statistics.median(v):.1f} us  {[round(x,1) for x in v]}")
print("ratio", statistics.median(res[PLAIN]) / statistics.median(res[C_SAMPLE]))
print("async ratio", statistics.median(res[ASYNC]) / statistics.median(res[C_SAMPLE]))
