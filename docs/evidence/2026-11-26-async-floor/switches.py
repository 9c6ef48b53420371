"""Scratch: context switches and CPU per trapped read, one core, for each server (perf stat)."""
import os, sys, tempfile, subprocess, time
from pathlib import Path
from contextlib import ExitStack
sys.path.insert(0, os.getcwd())
from bench.common import REPO, server_process
from bench.trapped import SERVERS, C_SAMPLE, PLAIN, ASYNC, _measure, _pin_process
cpu = 1
N = 5000
with tempfile.TemporaryDirectory() as d, ExitStack() as st:
    pids = {}
    for n, name in enumerate((C_SAMPLE, PLAIN, ASYNC)):
        s = Path(d) / f"s{n}.sock"
        pids[name] = (s, st.enter_context(server_process(SERVERS[name](s), s, cwd=REPO)).pid)
    os.sched_setaffinity(0, {cpu})
    for name, (s, pid) in pids.items():
        _pin_process(pid, {cpu})
        if os.environ.get("BATCH"):
            for t in Path(f"/proc/{pid}/task").iterdir():
                os.sched_setscheduler(int(t.name), os.SCHED_BATCH, os.sched_param(0))
        _measure(s, pid, 2000)
        out = f"/tmp/stat-{os.getpid()}.txt"
        p = subprocess.Popen(["perf", "stat", "-e", "context-switches,task-clock", "-p", str(pid), "-o", out])
        time.sleep(0.5)
        rate, floor, c = _measure(s, pid, N)
        p.send_signal(2); p.wait()
        text = open(out).read()
        cs = [l for l in text.splitlines() if "context-switches" in l][0].split()[0].replace(",", "")
        print(f"{name}: {c:.1f} us/read, {int(cs)/ (N*2):.2f} switches per read (incl. floor reads)")
