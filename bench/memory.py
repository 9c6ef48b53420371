"""Benchmark 5: memory-enable cost — revoke+restore against BAR size and resident size, populate per GiB.

Runs on :class:`vdev.model.memory.MappedMemory` directly: that is exactly
the work the server does inside the config write that clears or sets MEM.
The target is a cost that follows the resident pages, not the BAR size.
"""

from __future__ import annotations

import time

from bench.common import Row, median_of, progress
from vdev.model.memory import MappedMemory

MiB = 1 << 20
GiB = 1 << 30
NAME = "5. memory enable: revoke + restore"


def _touch(memory: MappedMemory, resident: int) -> None:
    view = memory.view
    for offset in range(0, resident, 4096):
        view[offset] = 1


def _revoke_restore(size: int, resident: int) -> float:
    memory = MappedMemory("bench", size)
    try:
        _touch(memory, resident)
        start = time.perf_counter()
        memory.revoke(keep_contents=True)
        memory.restore(populate=False)
        return time.perf_counter() - start
    finally:
        memory.close()


def _populate(size: int) -> float:
    memory = MappedMemory("bench", size)
    try:
        memory.revoke(keep_contents=False)
        start = time.perf_counter()
        memory.restore(populate=True)
        return time.perf_counter() - start
    finally:
        memory.close()


def run(quick: bool) -> list[Row]:
    repeats = 3 if quick else 5
    rows: list[Row] = []
    sizes = [1 * MiB, 16 * MiB, 256 * MiB, 1 * GiB]
    for size in sizes:
        for resident in (0, 1 * MiB, 4 * MiB):
            if resident > size:
                continue
            progress(f"revoke+restore: BAR {size // MiB} MiB, {resident // MiB} MiB resident")
            value, runs = median_of(repeats, lambda s=size, r=resident: _revoke_restore(s, r))
            rows.append(
                Row(
                    NAME,
                    f"BAR {size // MiB} MiB, {resident // MiB} MiB resident",
                    value * 1e3,
                    "ms",
                    runs=[r * 1e3 for r in runs],
                    target="∝ resident",
                )
            )
    progress("populate 1 GiB")
    value, runs = median_of(repeats, lambda: _populate(1 * GiB))
    rows.append(Row("5. memory enable: populate", "per resident GiB", value * 1e3, "ms", runs=[r * 1e3 for r in runs]))
    return rows
