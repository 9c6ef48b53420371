"""Tabulate the runs kept here: per kernel and scenario, each step's exit statuses and the driver's distinct messages.

python3 docs/evidence/nvme-faults-2026-11-26/summarize.py > docs/evidence/nvme-faults-2026-11-26/summary.md
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).parent
#: What varies between runs of one scenario (timestamps, tags, command ids) is masked so that outcomes compare.
VARYING = [(r"^\[ *[0-9.]+\] ", ""), (r"I/O (tag )?\d+", r"I/O \1N"), (r"\([0-9a-f]{4}\)", "(CID)")]
BOOT = ("ommand line", "pci function", "default/read/poll queues")


def message(line: str) -> str:
    for pattern, replacement in VARYING:
        line = re.sub(pattern, replacement, line)
    return line.strip()


runs: dict[tuple[str, str], list[dict]] = defaultdict(list)
for summary in sorted(HERE.glob("*/*/summary.json")):
    record = json.loads(summary.read_text())
    runs[(record["kernel"]["package_version"], record["scenario"])].append(record)

print("| kernel | scenario | runs | step exit statuses | driver messages (each in every run unless counted) |")
print("|---|---|---:|---|---|")
for (kernel, scenario), records in sorted(runs.items()):
    steps = defaultdict(list)
    seen: dict[str, int] = defaultdict(int)
    for record in records:
        for name, step in record["steps"].items():
            steps[name].append(step["status"])
        for line in {message(line) for line in record["dmesg"] if not any(word in line for word in BOOT)}:
            seen[line] += 1
    statuses = ", ".join(f"{name} {sorted(set(values))}" for name, values in steps.items())
    messages = "<br>".join(
        f"`{line}`" + ("" if count == len(records) else f" ({count}×)") for line, count in seen.items()
    )
    print(f"| {kernel} | {scenario} | {len(records)} | {statuses} | {messages} |")
