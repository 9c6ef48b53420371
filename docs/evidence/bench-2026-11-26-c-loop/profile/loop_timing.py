import os, sys, tempfile, time, statistics
from pathlib import Path
sys.path.insert(0, os.getcwd())
from bench.common import REPO, server_process
from bench.trapped import SERVERS, PLAIN, _measure, _pin_process
client_cpu, server_cpu = int(sys.argv[1]), int(sys.argv[2])
with tempfile.TemporaryDirectory() as d:
    s = Path(d) / "s.sock"
    argv = SERVERS[PLAIN](s)
    import subprocess
    proc = subprocess.Popen(argv, cwd=REPO, stderr=open("/tmp/cross2.err", "w"))
    while not s.exists(): time.sleep(0.05)
    os.sched_setaffinity(0, {client_cpu})
    _pin_process(proc.pid, {server_cpu})
    rates = []
    for i in range(3):
        rate, floor, c = _measure(s, proc.pid, 5000)
        rates.append(rate)
    print("rate", statistics.median(rates), "cpu", c)
    proc.terminate(); proc.wait()
