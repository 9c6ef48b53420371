"""Benchmarks 3, 4, 6 and 7: the vdev client against vdev servers, and the machine's floors.

3. REGION_READ round trips, vdev client → ``vdev serve`` in another process,
   next to a C ping-pong of 16-byte messages between two processes.
4. Read/write bandwidth through a client mapping of a vdev BAR, next to a
   plain memfd mapping (the same copy loop).
6. Interrupt latency: ``device.irq.trigger()`` → the client's eventfd read
   returns, in one process (a thread blocks in read(2) on the eventfd).
7. Scale: 1, 16, 64, 256 devices in one server process, each with a client
   doing accesses: aggregate accesses/s and server memory per device.
"""

from __future__ import annotations

import mmap
import os
import select
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import trio
import trio.lowlevel

from bench.common import REPO, Row, c_program, progress, server_process, vdev_server
from vdev.client import Client
from vdev.protocol.constants import IrqIndex
from vdev.testing import served
from vdev_devices.hello import Hello

MiB = 1 << 20


def _pingpong(rounds: int) -> float:
    return float(
        subprocess.run(
            [str(c_program(REPO / "bench" / "pingpong.c")), str(rounds)], capture_output=True, text=True, check=True
        ).stdout
    )


async def _round_trips(socket: Path, count: int) -> float:
    async with Client.connect(socket) as client:
        await client.region_write(7, 0x04, (0x2).to_bytes(2, "little"))
        start = time.perf_counter()
        for _ in range(count):
            await client.region_read(0, 0x04, 4)
        return count / (time.perf_counter() - start)


def round_trips(quick: bool) -> list[Row]:
    count, repeats = (1000, 3) if quick else (5000, 7)
    vdev_rates: list[float] = []
    floors: list[float] = []
    with tempfile.TemporaryDirectory(prefix="vdev-bench-") as directory:
        socket = Path(directory) / "rt.sock"
        with server_process(vdev_server("hello", socket), socket):
            for repeat in range(repeats):
                progress(f"client round trips: {repeat + 1}/{repeats}")
                vdev_rates.append(trio.run(_round_trips, socket, count))
                floors.append(_pingpong(count * 4))
    name = "3. client → server REGION_READ round trips"
    floor = statistics.median(floors)
    rate = statistics.median(vdev_rates)
    return [
        Row(
            name,
            "vdev client → vdev serve (plain handler)",
            rate,
            "round trips/s",
            "ping-pong",
            rate / floor,
            "≥ 0.8",
            vdev_rates,
        ),
        Row(name, "floor: C ping-pong, 16 bytes, two processes", floor, "round trips/s", runs=floors),
    ]


def _copy_rates(view: mmap.mmap, size: int) -> tuple[float, float]:
    chunk = 1 * MiB
    payload = b"\xa5" * chunk
    start = time.perf_counter()
    for offset in range(0, size, chunk):
        view[offset : offset + chunk] = payload
    write = size / (time.perf_counter() - start)
    start = time.perf_counter()
    for offset in range(0, size, chunk):
        view[offset : offset + chunk]
    read = size / (time.perf_counter() - start)
    return read / 1e9, write / 1e9


async def _mapped_bandwidth(size: int) -> tuple[float, float]:
    from vdev_devices.membar import MemBar

    with tempfile.TemporaryDirectory(prefix="vdev-bench-") as directory:
        socket = Path(directory) / "bw.sock"
        async with served(MemBar(size=str(size)), socket), Client.connect(socket) as client:
            await client.region_write(7, 0x04, (0x2).to_bytes(2, "little"))
            bar0 = await client.map_region(0)
            ((_, view),) = bar0.areas
            _copy_rates(view, size)  # fault everything in first
            return _copy_rates(view, size)


def _plain_bandwidth(size: int) -> tuple[float, float]:
    fd = os.memfd_create("bench", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        with mmap.mmap(fd, size) as view:
            _copy_rates(view, size)
            return _copy_rates(view, size)
    finally:
        os.close(fd)


def bandwidth(quick: bool) -> list[Row]:
    size, repeats = (64 * MiB, 3) if quick else (256 * MiB, 5)
    ours: list[tuple[float, float]] = []
    plain: list[tuple[float, float]] = []
    for repeat in range(repeats):
        progress(f"mapped bandwidth: {repeat + 1}/{repeats}")
        ours.append(trio.run(_mapped_bandwidth, size))
        plain.append(_plain_bandwidth(size))
    rows = []
    for index, direction in enumerate(("read", "write")):
        mine = statistics.median(r[index] for r in ours)
        base = statistics.median(r[index] for r in plain)
        name = "4. mapped BAR bandwidth"
        rows.append(
            Row(
                name,
                f"{direction}: client mapping of a vdev BAR",
                mine,
                "GB/s",
                "plain memfd",
                mine / base,
                "≥ 0.95",
                [r[index] for r in ours],
            )
        )
        rows.append(Row(name, f"{direction}: plain memfd mapping", base, "GB/s", runs=[r[index] for r in plain]))
    return rows


async def _irq_latencies(count: int) -> list[float]:
    device = Hello()
    with tempfile.TemporaryDirectory(prefix="vdev-bench-") as directory:
        socket = Path(directory) / "irq.sock"
        async with served(device, socket), Client.connect(socket) as client:
            (intx,) = await client.set_irqs(IrqIndex.INTX, 0, 1)
            fd = intx.fd
            assert fd is not None
            arrivals: list[int] = []
            arrived = threading.Semaphore(0)
            ready = threading.Event()

            def wait_for_interrupts() -> None:
                ready.set()
                poller = select.poll()
                poller.register(fd, select.POLLIN)
                for _ in range(count):
                    poller.poll()
                    arrivals.append(time.perf_counter_ns())
                    os.read(fd, 8)
                    arrived.release()

            waiter = threading.Thread(target=wait_for_interrupts)
            waiter.start()
            ready.wait()
            sent: list[int] = []
            for _ in range(count):
                sent.append(time.perf_counter_ns())
                device.irq.raise_intx()
                # Block (releasing the GIL) rather than spin, so the waiter thread is not held
                # off by the interpreter's switch interval.
                arrived.acquire()
                device.irq.lower_intx()
            waiter.join()
            return [(arrived - started) / 1e3 for started, arrived in zip(sent, arrivals)]


def irq_latency(quick: bool) -> list[Row]:
    count = 500 if quick else 3000
    progress("interrupt latency")
    latencies = sorted(trio.run(_irq_latencies, count))
    name = "6. interrupt latency: trigger → eventfd read returns"
    p99 = latencies[int(0.99 * (len(latencies) - 1))]
    return [
        Row(name, "median", statistics.median(latencies), "µs", runs=latencies[:: max(1, len(latencies) // 50)]),
        Row(name, "p99", p99, "µs"),
    ]


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


async def _drive(sockets: list[Path], seconds: float) -> int:
    done = 0

    async def one(socket: Path) -> None:
        nonlocal done
        async with Client.connect(socket) as client:
            await client.region_write(7, 0x04, (0x2).to_bytes(2, "little"))
            deadline = trio.current_time() + seconds
            while trio.current_time() < deadline:
                await client.region_read(0, 0x04, 4)
                done += 1

    async with trio.open_nursery() as nursery:
        for socket in sockets:
            nursery.start_soon(one, socket)
    return done


def scale(quick: bool) -> list[Row]:
    counts = (1, 16, 64) if quick else (1, 16, 64, 256)
    seconds = 2.0 if quick else 4.0
    rows = []
    baseline_kib = None
    for count in counts:
        progress(f"scale: {count} devices")
        with tempfile.TemporaryDirectory(prefix="vdev-scale-") as directory:
            sockets = [Path(directory) / f"dev{n:03d}.sock" for n in range(count)]
            argv = [sys.executable, "-m", "bench.scale_server", str(count), directory]
            with server_process(argv, sockets[-1]) as server:
                idle_kib = _rss_kib(server.pid)
                accesses = trio.run(_drive, sockets, seconds)
                busy_kib = _rss_kib(server.pid)
        if baseline_kib is None:
            baseline_kib = idle_kib
        per_device = (busy_kib - baseline_kib) / max(count - 1, 1) / 1024 if count > 1 else 0.0
        rows.append(
            Row(
                "7. scale: devices in one process",
                f"{count} devices: aggregate accesses",
                accesses / seconds,
                "accesses/s",
            )
        )
        if count > 1:
            rows.append(
                Row(
                    "7. scale: devices in one process",
                    f"{count} devices: server memory per extra device",
                    per_device,
                    "MiB",
                    target="≤ 2",
                )
            )
    return rows


def run(quick: bool) -> list[Row]:
    return round_trips(quick) + bandwidth(quick) + irq_latency(quick) + scale(quick)
