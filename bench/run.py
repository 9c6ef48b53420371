"""``make bench``: run the benchmark suite, write results/bench.json and a Markdown table.

Usage: python -m bench.run [--quick] [--only NAME ...] [--markdown PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from bench import client, guest, memory, nvme, trapped
from bench.common import REPO, Row

SUITES = {"trapped": trapped.run, "client": client.run, "memory": memory.run, "guest": guest.run, "nvme": nvme.run}


def machine() -> dict[str, str]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    qemu = subprocess.run([str(REPO / ".deps/bin/qemu-system-x86_64"), "--version"], capture_output=True, text=True)
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "memory": f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "qemu": qemu.stdout.splitlines()[0] if qemu.stdout else "?",
    }


def fmt(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def spread(runs: list[float]) -> str:
    """The range of the repeated measurements behind a median."""
    if len(runs) < 2:
        return ""
    return f"{fmt(min(runs))}–{fmt(max(runs))}"


def markdown(rows: list[Row], info: dict[str, str]) -> str:
    lines = [
        "| benchmark | case | median | spread | unit | ratio | vs | target |",
        "|---|---|---:|---:|---|---:|---|---|",
    ]
    for row in rows:
        ratio = f"{row.ratio:.2f}" if row.ratio is not None else ""
        lines.append(
            f"| {row.benchmark} | {row.case} | {fmt(row.value)} | {spread(row.runs)} | {row.unit} | {ratio} |"
            f" {row.baseline} | {row.target} |"
        )
    machine_line = ", ".join(f"{key}: {value}" for key, value in info.items())
    return f"Machine: {machine_line}\n\n" + "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(prog="make bench")
    parser.add_argument("--quick", action="store_true", help="fewer iterations (a smoke run)")
    parser.add_argument("--only", nargs="*", choices=sorted(SUITES), help="run only these suites")
    parser.add_argument("--json", type=Path, default=REPO / "results" / "bench.json")
    parser.add_argument("--markdown", type=Path, default=REPO / "results" / "bench.md")
    args = parser.parse_args()
    started = time.monotonic()
    rows: list[Row] = []
    info = machine()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    for name in args.only or SUITES:
        print(f"{name}:", file=sys.stderr, flush=True)
        rows += SUITES[name](args.quick)
        # Written after every suite, so a later suite's failure keeps what was measured.
        args.json.write_text(json.dumps({"machine": info, "rows": [asdict(r) for r in rows]}, indent=2))
    table = markdown(rows, info)
    args.markdown.write_text(table)
    print(table)
    print(f"({time.monotonic() - started:.0f} s; results in {args.json} and {args.markdown})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
