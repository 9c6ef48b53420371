"""Benchmark 8: a guest driver's view — a Linux guest reading a trapped register in a loop.

A TCG guest boots with the device attached through QEMU's ``vfio-user-pci``
and runs ``guest-reads`` (bench/guest_reads.c): ``inl`` on the device's I/O
BAR from user space, so every read is a trap into QEMU and a message to the
device server — the rate a polling guest driver sees.  The same guest runs
against libvfio-user's C gpio sample and against vdev serving the same
register (plain and ``async`` handler), interleaved round by round; the
ratio to the C sample is reported, with the server's CPU per read over the
guest's timed loop.

The program is compiled here (static) and added to the guest with the
harness's ``files``, so the shared initramfs is never rebuilt.
"""

from __future__ import annotations

import statistics
import tempfile
from contextlib import ExitStack
from pathlib import Path

import trio

from bench.common import REPO, Row, c_program, cpu_seconds_since, progress, server_process, thread_cpu
from bench.trapped import ASYNC, C_SAMPLE, PLAIN, SERVERS
from vdev.qemu.guest import GuestArtefacts, GuestError, GuestMachine
from vdev.testing import vfio_user_pci

NAME = "8. guest inl loop on a trapped register (TCG, vfio-user-pci)"
ADDRESS = "0000:00:03.0"
TARGETS = {C_SAMPLE: "", PLAIN: "≥ 0.9", ASYNC: ""}


async def _guest_reads(
    artefacts: GuestArtefacts, program: bytes, socket: Path, pid: int, count: int
) -> tuple[float, float]:
    """(reads/s the guest saw, server CPU µs per read) for one boot."""
    command = f"guest-reads /sys/bus/pci/devices/{ADDRESS} 2 0 {count}"
    async with GuestMachine(
        kernel=artefacts.kernel,
        initrd=artefacts.initrd,
        devices=[vfio_user_pci(socket, addr="0x3")],
        files={"/bin/guest-reads": program},
        run=[command],
        timeout=120,
    ) as vm:
        await vm.expect("bench.start")
        before = thread_cpu(pid)
        done = await vm.expect("bench.reads")
        cpu = cpu_seconds_since(pid, before)
        await vm.expect("run.exit", cmd=command)
    return done["count"] / done["seconds"], cpu / done["count"] * 1e6


def _boot(artefacts: GuestArtefacts, program: bytes, socket: Path, pid: int, count: int) -> tuple[float, float]:
    """One boot, tried again (twice at most) when the guest fails: a benchmark, not a test."""
    attempt = 1
    while True:
        try:
            return trio.run(_guest_reads, artefacts, program, socket, pid, count)
        except GuestError as failure:
            if attempt == 3:
                raise
            progress(f"guest boot failed ({type(failure).__name__}), attempt {attempt}/3")
            attempt += 1


def run(quick: bool) -> list[Row]:
    try:
        artefacts = GuestArtefacts.find()
    except FileNotFoundError as missing:
        progress(f"guest row skipped: {missing}")
        return []
    count, rounds = (5000, 2) if quick else (20000, 5)
    program = c_program(REPO / "bench" / "guest_reads.c", "-static", f"-I{REPO / 'guest'}").read_bytes()
    rates: dict[str, list[float]] = {name: [] for name in SERVERS}
    cpus: dict[str, list[float]] = {name: [] for name in SERVERS}
    with tempfile.TemporaryDirectory(prefix="vdev-bench-") as directory, ExitStack() as servers:
        pids = {}
        for number, (name, argv) in enumerate(SERVERS.items()):
            socket = Path(directory) / f"guest{number}.sock"
            pids[name] = (socket, servers.enter_context(server_process(argv(socket), socket, cwd=REPO)).pid)
        for round_number in range(rounds):
            progress(f"guest reads: round {round_number + 1}/{rounds}")
            for name, (socket, pid) in pids.items():
                rate, cpu = _boot(artefacts, program, socket, pid, count)
                rates[name].append(rate)
                cpus[name].append(cpu)
    c_rate = statistics.median(rates[C_SAMPLE])
    c_cpu = statistics.median(cpus[C_SAMPLE])
    rows = []
    for name in SERVERS:
        rate, cpu = statistics.median(rates[name]), statistics.median(cpus[name])
        rows.append(Row(NAME, name, rate, "reads/s", C_SAMPLE, rate / c_rate, TARGETS[name], rates[name]))
        rows.append(Row(NAME, f"{name}: server CPU per read", cpu, "µs", C_SAMPLE, cpu / c_cpu, runs=cpus[name]))
    return rows
