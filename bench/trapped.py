"""Benchmarks 1 and 2: trapped 4-byte reads through real QEMU (qtest), and server CPU per access.

Three servers expose the same I/O BAR register: libvfio-user's C
gpio-pci-idio-16 sample, vdev with a plain handler, vdev with an ``async``
handler.  QEMU in qtest mode reads it in a loop, driven by the lean
blocking client of :mod:`bench.lean_qtest` so that the client is never the
bottleneck: the bare qtest round trip (a RAM read, no device) is reported
as the floor, with its ratio to the C sample.  Throughput is compared as a
ratio to the C sample, and so is CPU time per access (user+sys of every
thread of the server process).
"""

from __future__ import annotations

import statistics
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
import os

SERVER_CPUS = {int(c) for c in os.environ["SCPU"].split(",")} if os.environ.get("SCPU") else None


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


def run(quick: bool) -> list[Row]:
    """All three servers run at once; each round measures each in turn, so drift hits them alike."""
    reads, rounds = (1000, 3) if quick else (5000, 9)
    throughput: dict[str, list[float]] = {name: [] for name in SERVERS}
    cpu: dict[str, list[float]] = {name: [] for name in SERVERS}
    floors: list[float] = []
    with tempfile.TemporaryDirectory(prefix="vdev-bench-") as directory, ExitStack() as servers:
        pids = {}
        for number, (name, argv) in enumerate(SERVERS.items()):
            socket = Path(directory) / f"bench{number}.sock"
            pids[name] = (
                socket,
                servers.enter_context(server_process(argv(socket), socket, cwd=REPO, cpus=SERVER_CPUS)).pid,
            )
        for round_number in range(rounds):
            progress(f"trapped reads through QEMU: round {round_number + 1}/{rounds}")
            for name, (socket, pid) in pids.items():
                rate, floor, cpu_per_read = _measure(socket, pid, reads)
                throughput[name].append(rate)
                cpu[name].append(cpu_per_read)
                floors.append(floor)
    c_rate = statistics.median(throughput[C_SAMPLE])
    c_cpu = statistics.median(cpu[C_SAMPLE])
    rows: list[Row] = []
    for name in SERVERS:
        rate, cpu_us = statistics.median(throughput[name]), statistics.median(cpu[name])
        rate_target, cpu_target = TARGETS[name]
        rows.append(Row(THROUGHPUT, name, rate, "reads/s", C_SAMPLE, rate / c_rate, rate_target, throughput[name]))
        ratio = cpu_us / c_cpu if c_cpu else None
        rows.append(Row(CPU, name, cpu_us, "µs", C_SAMPLE, ratio, cpu_target, cpu[name]))
    floor = statistics.median(floors)
    rows.append(
        Row(THROUGHPUT, "floor: bare qtest round trip", floor, "reads/s", C_SAMPLE, floor / c_rate, "≥ 2", floors)
    )
    return rows
