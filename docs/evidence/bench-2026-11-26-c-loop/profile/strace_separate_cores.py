import os, sys, tempfile, time, statistics, subprocess
from pathlib import Path
sys.path.insert(0, os.getcwd())
from bench.common import REPO
from bench.trapped import SERVERS, PLAIN, C_SAMPLE, _measure, _pin_process
who = PLAIN if sys.argv[1] == "plain" else C_SAMPLE
with tempfile.TemporaryDirectory() as d:
    s = Path(d) / "s.sock"
    proc = subprocess.Popen(SERVERS[who](s), cwd=REPO, stderr=subprocess.DEVNULL)
    while not s.exists(): time.sleep(0.05)
    time.sleep(0.5)
    os.sched_setaffinity(0, {0})
    _pin_process(proc.pid, {1})
    st = subprocess.Popen(["strace", "-f", "-c", "-o", f"/tmp/strace-{sys.argv[1]}.txt", "-p", str(proc.pid)])
    time.sleep(1)
    rate, floor, c = _measure(s, proc.pid, 5000)
    print(who, "rate", rate)
    st.send_signal(2); st.wait()
    proc.terminate(); proc.wait()
