"""Shared pieces of the benchmark suite: results, repetition, servers in their own process.

Every comparison is measured side by side in one run and reported as a
ratio, because these machines are noisy; each number is the median of
repeated runs.
"""

from __future__ import annotations

import functools
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from vdev import deps

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Row:
    """One line of the results table."""

    benchmark: str
    case: str
    value: float
    unit: str
    baseline: str = ""
    ratio: float | None = None
    target: str = ""
    runs: list[float] = field(default_factory=list)


@functools.cache
def _build_dir() -> Path:
    """Where this run compiles its C helpers: a temporary directory, removed at exit.

    Not the deps cache, which may be shared between checkouts and is
    written only by provisioning.
    """
    directory = tempfile.TemporaryDirectory(prefix="vdev-bench-build-")
    _BUILDS.append(directory)
    return Path(directory.name)


_BUILDS: list[tempfile.TemporaryDirectory[str]] = []


@functools.cache
def c_program(source: Path, *flags: str) -> Path:
    """Compile one of the benchmark's C helpers (``gcc -O2 FLAGS``), once per run."""
    binary = _build_dir() / source.stem
    subprocess.run(["gcc", "-O2", "-Wall", "-Wextra", *flags, "-o", str(binary), str(source)], check=True)
    return binary


def median_of(repeats: int, measure: Callable[[], float]) -> tuple[float, list[float]]:
    """The median of ``repeats`` measurements, and the measurements."""
    runs = [measure() for _ in range(repeats)]
    return statistics.median(runs), runs


def progress(message: str) -> None:
    print(f"  … {message}", file=sys.stderr, flush=True)


def thread_cpu(pid: int) -> dict[int, int]:
    """CPU nanoseconds each live thread of a process has used so far (/proc/PID/task/TID/schedstat).

    /proc/PID/stat counts clock ticks (10 ms), too coarse for per-access
    costs, and /proc/PID/schedstat covers the main thread only.
    """
    used = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            used[int(task.name)] = int((task / "schedstat").read_text().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            continue  # the thread ended meanwhile
    return used


def cpu_seconds_since(pid: int, before: dict[int, int]) -> float:
    """CPU seconds the process's threads used since :func:`thread_cpu` returned ``before``.

    Threads started since count whole; a thread that ended meanwhile is
    missed (the servers measured here keep theirs for their whole life).
    """
    now = thread_cpu(pid)
    return sum(used - before.get(tid, 0) for tid, used in now.items()) / 1e9


def wait_for_path(path: Path, process: subprocess.Popen[bytes], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} before creating {path}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"server did not create {path}")
        time.sleep(0.02)


@contextmanager
def server_process(argv: list[str], socket: Path, cwd: Path = REPO) -> Iterator[subprocess.Popen[bytes]]:
    """A vfio-user server in its own process (so its CPU time can be read), stopped afterwards."""
    socket.unlink(missing_ok=True)
    process = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_path(socket, process)
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        socket.unlink(missing_ok=True)


def vdev_server(device: str, socket: Path, *params: str) -> list[str]:
    argv = [sys.executable, "-m", "vdev", "serve", device, "--socket-path", str(socket)]
    for param in params:
        argv += ["--param", param]
    return argv


def c_sample_server(socket: Path) -> list[str]:
    """libvfio-user's C gpio-pci-idio-16 sample, built from the same source as the library."""
    return [str(deps.libvfio_user_sample("gpio-pci-idio-16")), str(socket)]
