"""Benchmarks 1 and 2: trapped 4-byte reads through real QEMU (qtest), and server CPU per access.

Three servers expose the same I/O BAR register: libvfio-user's C
gpio-pci-idio-16 sample, vdev with a plain handler, vdev with an ``async``
handler.  QEMU in qtest mode reads it in a loop, driven by the lean
blocking client of :mod:`bench.lean_qtest` so that the client is never the
bottleneck: the bare qtest round trip (a RAM read, no device) is reported
as the floor, with its ratio to the C sample.  Throughput is compared as a
ratio to the C sample, and so is CPU time per access (every thread of the
server process).  Beside them row 2 reports the floor under an ``async``
handler's access, the bare hand-over to Trio and back
(:mod:`bench.handover`), pinned where the servers are.

Where the processes run decides what a message costs, so both rows are
measured in two fixed placements, never left to the scheduler (which
flips between them from one run to the next on a small VM):

* **one core** — client, QEMU and server pinned to the same CPU: every
  hand-off is a same-core context switch, so CPU per access is the
  server's own work (the C sample's is the library's: system calls and
  parsing).
* **separate cores** — the server on one CPU, client and QEMU on another,
  as a device server beside a VMM's vCPU would be: every message wakes the
  server across cores, which costs both servers alike.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from bench.common import (
    REPO,
    Row,
    c_sample_server,
    cpu_seconds_since,
    progress,
    server_process,
    thread_cpu,
    vdev_server,
)
from bench.lean_qtest import RAM_ADDRESS, LeanQemu

C_SAMPLE = "C sample (libvfio-user)"
THROUGHPUT = "1. trapped 4-byte reads via QEMU qtest"
CPU = "2. server CPU per trapped access"
PLAIN = "vdev, plain handler"
ASYNC = "vdev, async handler"
SERVERS = {
    C_SAMPLE: lambda socket: c_sample_server(socket),
    PLAIN: lambda socket: vdev_server("bench.devices:SyncCounter", socket),
    ASYNC: lambda socket: vdev_server("bench.devices:AsyncCounter", socket),
}
#: (row 1, row 2) targets per server, from issue 20.
TARGETS = {C_SAMPLE: ("", ""), PLAIN: ("≥ 0.85", "≤ 2"), ASYNC: ("≥ 0.7", "≤ 4")}
WARM_UP = 200
HANDOVER = "floor: hand-over to Trio and back (bench/handover.py, no server)"


def placements() -> dict[str, tuple[set[int], set[int]]]:
    """Placement name -> (CPUs of client and QEMU, CPUs of the server), from the CPUs we may use."""
    first, *others = sorted(os.sched_getaffinity(0))
    layouts = {"one core": ({first}, {first})}
    if others:
        layouts["separate cores"] = ({first}, {others[0]})
    return layouts


def _pin_process(pid: int, cpus: set[int]) -> None:
    """Pin every thread of a running process (affinity is per thread)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            os.sched_setaffinity(int(task.name), cpus)
        except ProcessLookupError:
            continue


def _measure(socket: Path, server_pid: int, reads: int) -> tuple[float, float, float]:
    """(device reads/s, bare qtest round trips/s, server CPU µs per read)."""
    with LeanQemu(socket) as vm:
        port = vm.enable_io_bar(2)
        read_port = f"inl {port:#x}\n".encode()
        vm.repeat(read_port, WARM_UP)
        cpu_before, start = thread_cpu(server_pid), time.perf_counter()
        vm.repeat(read_port, reads)
        elapsed, cpu = time.perf_counter() - start, cpu_seconds_since(server_pid, cpu_before)
        read_ram = f"readl {RAM_ADDRESS:#x}\n".encode()
        floor_start = time.perf_counter()
        vm.repeat(read_ram, reads)
        floor = time.perf_counter() - floor_start
    return reads / elapsed, reads / floor, cpu / reads * 1e6


def _handover_cpu(cpus: set[int], count: int) -> float:
    """CPU µs per thread → Trio → thread hand-over, measured by :mod:`bench.handover` pinned to ``cpus``."""
    result = subprocess.run(
        [sys.executable, "-m", "bench.handover", str(count)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        preexec_fn=lambda: os.sched_setaffinity(0, cpus),
    )
    return float(result.stdout)


def run(quick: bool) -> list[Row]:
    """All three servers run at once; each round measures each in turn, so drift hits them alike."""
    reads, rounds = (1000, 3) if quick else (5000, 9)
    layouts = placements()
    throughput = {(where, name): [] for where in layouts for name in SERVERS}
    cpu = {(where, name): [] for where in layouts for name in SERVERS}
    floors: dict[str, list[float]] = {where: [] for where in layouts}
    handovers: dict[str, list[float]] = {where: [] for where in layouts}
    own_cpus = os.sched_getaffinity(0)
    with tempfile.TemporaryDirectory(prefix="vdev-bench-") as directory, ExitStack() as servers:
        pids = {}
        for number, (name, argv) in enumerate(SERVERS.items()):
            socket = Path(directory) / f"bench{number}.sock"
            pids[name] = (socket, servers.enter_context(server_process(argv(socket), socket, cwd=REPO)).pid)
        try:
            for round_number in range(rounds):
                progress(f"trapped reads through QEMU: round {round_number + 1}/{rounds}")
                for where, (client_cpus, server_cpus) in layouts.items():
                    os.sched_setaffinity(0, client_cpus)  # QEMU inherits it
                    for name, (socket, pid) in pids.items():
                        _pin_process(pid, server_cpus)
                        rate, floor, cpu_per_read = _measure(socket, pid, reads)
                        throughput[where, name].append(rate)
                        cpu[where, name].append(cpu_per_read)
                        floors[where].append(floor)
                    handovers[where].append(_handover_cpu(server_cpus, reads))
        finally:
            os.sched_setaffinity(0, own_cpus)
    rows: list[Row] = []
    for where in layouts:
        c_rate = statistics.median(throughput[where, C_SAMPLE])
        c_cpu = statistics.median(cpu[where, C_SAMPLE])
        for name in SERVERS:
            rates, cpus = throughput[where, name], cpu[where, name]
            rate, cpu_us = statistics.median(rates), statistics.median(cpus)
            rate_target, cpu_target = TARGETS[name]
            rows.append(
                Row(f"{THROUGHPUT}, {where}", name, rate, "reads/s", C_SAMPLE, rate / c_rate, rate_target, rates)
            )
            rows.append(Row(f"{CPU}, {where}", name, cpu_us, "µs", C_SAMPLE, cpu_us / c_cpu, cpu_target, cpus))
        handover = statistics.median(handovers[where])
        rows.append(Row(f"{CPU}, {where}", HANDOVER, handover, "µs", C_SAMPLE, handover / c_cpu, "", handovers[where]))
        floor = statistics.median(floors[where])
        rows.append(
            Row(
                f"{THROUGHPUT}, {where}",
                "floor: bare qtest round trip (lean client)",
                floor,
                "reads/s",
                C_SAMPLE,
                floor / c_rate,
                "≥ 2",
                floors[where],
            )
        )
    return rows
