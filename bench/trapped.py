"""Benchmarks 1 and 2: trapped 4-byte reads through real QEMU (qtest), and server CPU per access.

Three servers expose the same I/O BAR register: libvfio-user's C
gpio-pci-idio-16 sample, vdev with a plain handler, vdev with an ``async``
handler.  QEMU in qtest mode reads it in a loop; the bare qtest round trip
(a RAM read, no device) is the floor.  Throughput is compared as a ratio to
the C sample, CPU time per access (user+sys of the server process) too.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import trio

from bench.common import REPO, Row, c_sample_server, cpu_seconds, progress, server_process, vdev_server
from vdev.qemu import QemuMachine
from vdev.testing import vfio_user_pci

C_SAMPLE = "C sample (libvfio-user)"
THROUGHPUT = "1. trapped 4-byte reads via QEMU qtest"
CPU = "2. server CPU per trapped access"
SERVERS = {
    C_SAMPLE: lambda socket: c_sample_server(socket),
    "vdev, plain handler": lambda socket: vdev_server("bench.devices:SyncCounter", socket),
    "vdev, async handler": lambda socket: vdev_server("bench.devices:AsyncCounter", socket),
}


async def _measure(socket: Path, server_pid: int, reads: int) -> tuple[float, float, float]:
    """(device reads/s, bare qtest round trips/s, server CPU µs per read)."""
    async with QemuMachine(devices=[vfio_user_pci(socket)]) as vm:
        card = await (await vm.pci_bus()).find(0x494F, 0x0DC8)
        await card.map_bars()
        await card.enable(memory=False, io=True, master=False)
        port = card.bar_address(2)
        cpu_before, start = cpu_seconds(server_pid), time.perf_counter()
        for _ in range(reads):
            await vm.qtest.inl(port)
        elapsed, cpu = time.perf_counter() - start, cpu_seconds(server_pid) - cpu_before
        floor_start = time.perf_counter()
        for _ in range(reads):
            await vm.qtest.readl(0x1000)
        floor = time.perf_counter() - floor_start
    return reads / elapsed, reads / floor, cpu / reads * 1e6


def run(quick: bool) -> list[Row]:
    """All three servers run at once; each round measures each in turn, so drift hits them alike."""
    reads, rounds = (500, 3) if quick else (2000, 7)
    throughput: dict[str, list[float]] = {name: [] for name in SERVERS}
    cpu: dict[str, list[float]] = {name: [] for name in SERVERS}
    floors: list[float] = []
    with tempfile.TemporaryDirectory(prefix="vdev-bench-") as directory, ExitStack() as servers:
        pids = {}
        for number, (name, argv) in enumerate(SERVERS.items()):
            socket = Path(directory) / f"bench{number}.sock"
            pids[name] = (socket, servers.enter_context(server_process(argv(socket), socket, cwd=REPO)).pid)
        for round_number in range(rounds):
            progress(f"trapped reads through QEMU: round {round_number + 1}/{rounds}")
            for name, (socket, pid) in pids.items():
                rate, floor, cpu_per_read = trio.run(_measure, socket, pid, reads)
                throughput[name].append(rate)
                cpu[name].append(cpu_per_read)
                floors.append(floor)
    c_rate = statistics.median(throughput[C_SAMPLE])
    c_cpu = statistics.median(cpu[C_SAMPLE])
    rows: list[Row] = []
    for name in SERVERS:
        rate, cpu_us = statistics.median(throughput[name]), statistics.median(cpu[name])
        rows.append(Row(THROUGHPUT, name, rate, "reads/s", C_SAMPLE, rate / c_rate, "≥ 0.95", throughput[name]))
        ratio = cpu_us / c_cpu if c_cpu else None
        rows.append(Row(CPU, name, cpu_us, "µs", C_SAMPLE, ratio, "≤ 3 (plain handler)", cpu[name]))
    rows.append(Row(THROUGHPUT, "floor: bare qtest round trip", statistics.median(floors), "reads/s", runs=floors))
    return rows
