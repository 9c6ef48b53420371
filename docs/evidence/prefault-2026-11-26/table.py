"""The tables of docs/experiment.md's "Prefault at enable" section, from the runs' experiment.json files.

    python3 docs/evidence/prefault-2026-11-26/table.py docs/evidence/prefault-2026-11-26/{stock,prefault}
"""

import json
import statistics
import sys
from pathlib import Path


def p90(values):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]


def us(ns):
    return f"{ns / 1000:.1f}"


for folder in map(Path, sys.argv[1:]):
    document = json.loads((folder / "experiment.json").read_text())
    runs = [run for run in document["runs"] if run["mode"] == "guest"]
    patch = runs[0]["provenance"]["kernel_patch"] or "stock"
    faults = [n for run in runs for n in run["faults_per_enable"]]
    first = [ns for run in runs for ns in run["first_touch_ns"]["quiet"]]
    enable = [ns for run in runs for ns in run["enable_ns"]["quiet"]]
    loaded = [ns for run in runs for ns in run["enable_ns"]["under_load"]]
    storms = [run["storm"] for run in runs if run["storm"]]
    verdicts = {}
    for run in runs:
        for verdict in run["verdicts"]:
            verdicts[verdict["name"]] = verdicts.get(verdict["name"], 0) + verdict["passed"]
    print(f"### {patch} ({len(runs)} runs)\n")
    print("| measure | N | median | p90 | min | max |")
    print("|---|---|---|---|---|---|")
    print(f"| faults per quiet enable (first touch + walk of BAR0) | {len(faults)} | {statistics.median(faults):g} "
          f"| {p90(faults)} | {min(faults)} | {max(faults)} |")
    for name, values in (("first touch after a quiet enable, µs", first),
                         ("enabling COMMAND write, quiet, µs", enable),
                         ("enabling COMMAND write, under load, µs", loaded)):
        print(f"| {name} | {len(values)} | {us(statistics.median(values))} | {us(p90(values))} "
              f"| {us(min(values))} | {us(max(values))} |")
    if storms:
        per_cycle = [s["ns"] / s["cycles"] for s in storms]
        print(f"| storm: faults per enable (12 touchers, 6 vmas) | {sum(s['cycles'] for s in storms)} | "
              f"- | - | {min(s['faults_per_cycle_min'] for s in storms)} | "
              f"{max(s['faults_per_cycle_max'] for s in storms)} |")
        print(f"| storm: faults in all (per run) | {len(storms)} | "
              f"{statistics.median(s['faults'] for s in storms):g} | - | {min(s['faults'] for s in storms)} | "
              f"{max(s['faults'] for s in storms)} |")
        print(f"| storm: one off/on cycle with its touches, µs (per run) | {len(storms)} | "
              f"{us(statistics.median(per_cycle))} | - | {us(min(per_cycle))} | {us(max(per_cycle))} |")
    print()
    print("Verdicts passed: " + ", ".join(f"`{name}` {n}/{len(runs)}" for name, n in verdicts.items()) + "\n")
