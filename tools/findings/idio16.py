"""Reproduce finding 1 of docs/findings.md: gpio-pci-idio-16's regmap-irq NULL call, with its control.

Usage (from the repository root, after ``make guest KERNELS=...``)::

    make finding-idio16 KERNELS="bookworm trixie" REPEAT=3
    python -m tools.findings.idio16 --kernels "bookworm trixie" --repeat 3 --out results/findings/idio16-regmap-irq

Each repeat boots every kernel set three times with vdev's ``idio16`` card
(tests/guest/idio16_edges.py runs and classifies each boot):

``one_line``
    edges requested on chip line 20 (card input 4) only, then input 4
    rises — the trigger, with the harness defaults (``oops=panic``);
``one_line_lives``
    the same with panic off, so the guest lives on after the oops and IRQ
    0's interrupt count is read again (``handle_nested_irq(0)`` counts one);
``all_lines``
    edges on all 16 input lines, then the same change — the control.

Written to ``--out``: ``outcomes.json`` (per kernel package: how many runs
of each variant ended in each outcome, IRQ 0's count change, the
provenance of the runs), ``runs.json`` (every run: edges, the card's BAR2
accesses, the kernel report) and ``console/<set>.txt`` (each run's console
from the first command on).  Kernel packages already in ``outcomes.json``
and not run again are kept, so ``--out docs/evidence/idio16-regmap-irq``
adds to the recorded evidence that tests/guest/test_idio16_driver.py reads.

A run that ends in neither known outcome is recorded as ``other`` with its
error; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio

from tests.guest.idio16_edges import ALL_INPUT_LINES, CHANGED_LINE, EdgeRun, edge_run
from vdev import deps
from vdev.provenance import collect
from vdev.qemu.guest import GuestArtefacts

#: Variant name -> (lines with edge detection, panic on a kernel problem).
VARIANTS: dict[str, tuple[list[int], bool]] = {
    "one_line": ([CHANGED_LINE], True),
    "one_line_lives": ([CHANGED_LINE], False),
    "all_lines": (ALL_INPUT_LINES, True),
}
OTHER = "other"


def console_excerpt(log: Path) -> list[str]:
    """The console from ``/init``'s first command on (the boot before it is the same in every run)."""
    lines = log.read_bytes().decode(errors="replace").replace("\r", "").splitlines()
    start = next((i for i, line in enumerate(lines) if '"kind":"run.start"' in line), 0)
    return lines[start:]


async def one_run(artefacts: GuestArtefacts, variant: str, workdir: Path) -> tuple[dict[str, Any], list[str]]:
    """One boot of ``variant``: its JSON record and its console excerpt."""
    lines, panic = VARIANTS[variant]
    record: dict[str, Any] = {"set": artefacts.name, "variant": variant}
    try:
        run: EdgeRun = await edge_run(
            deps.qemu_path(), artefacts, workdir / "idio16.sock", lines, panic_on_problem=panic, workdir=workdir
        )
    except Exception as exc:  # recorded as the evidence of an unknown outcome; the exit status says so
        record |= {"outcome": OTHER, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
    else:
        record |= run.to_json()
    log = workdir / "console.log"
    return record, console_excerpt(log) if log.exists() else []


def summarise(
    runs: Sequence[dict[str, Any]], artefacts: GuestArtefacts, repeats: int, provenance: dict[str, Any]
) -> dict[str, Any]:
    """The ``outcomes.json`` entry of one kernel set: outcome counts per variant and IRQ 0's count changes."""
    entry: dict[str, Any] = {"set": artefacts.name, "release": artefacts.release, "repeats": repeats}
    for variant in VARIANTS:
        counts: dict[str, int] = {}
        for run in runs:
            if run["variant"] == variant:
                counts[run["outcome"]] = counts.get(run["outcome"], 0) + 1
        entry[variant] = counts
    entry["irq0_change"] = {
        variant: [
            run["irq0"][1] - run["irq0"][0]
            for run in runs
            if run["variant"] == variant and run.get("irq0") and None not in run["irq0"]
        ]
        for variant in VARIANTS
    }
    entry["provenance"] = provenance
    entry["console"] = f"console/{artefacts.name}.txt"
    return entry


async def run_all(kernels: Sequence[str], repeats: int, out: Path) -> int:
    outcomes_path = out / "outcomes.json"
    runs_path = out / "runs.json"
    outcomes: dict[str, Any] = json.loads(outcomes_path.read_text()) if outcomes_path.exists() else {"kernels": {}}
    all_runs: list[dict[str, Any]] = json.loads(runs_path.read_text()) if runs_path.exists() else []
    (out / "console").mkdir(parents=True, exist_ok=True)
    unknown = 0
    for name in kernels:
        artefacts = GuestArtefacts.find(name)
        key = f"{artefacts.package}={artefacts.package_version}"
        provenance = collect(artefacts).to_json()  # before the runs: the code and components they use
        runs: list[dict[str, Any]] = []
        console: list[str] = []
        for repeat in range(1, repeats + 1):
            for variant in VARIANTS:
                with tempfile.TemporaryDirectory(prefix="vdev-idio16-") as tmp:
                    record, excerpt = await one_run(artefacts, variant, Path(tmp))
                record |= {"package": key, "repeat": repeat}
                runs.append(record)
                console += [f"=== {name} ({key}) {variant} run {repeat}: {record['outcome']}", *excerpt, ""]
                unknown += record["outcome"] == OTHER
                detail = record.get("error") or f"irq0 {record.get('irq0')}"
                print(f"{name} {variant} {repeat}/{repeats}: {record['outcome']} {detail}", flush=True)
        outcomes["kernels"][key] = summarise(runs, artefacts, repeats, provenance)
        all_runs = [run for run in all_runs if run["package"] != key] + runs
        (out / "console" / f"{name}.txt").write_text("\n".join(console))
    outcomes_path.write_text(json.dumps(outcomes, indent=1, sort_keys=True) + "\n")
    runs_path.write_text(json.dumps(all_runs, indent=1) + "\n")
    for key, entry in sorted(outcomes["kernels"].items()):
        counts = {variant: entry[variant] for variant in VARIANTS}
        print(f"{key}: {entry['repeats']} repeats {counts} irq0 change {entry['irq0_change']}")
    return 1 if unknown else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.findings.idio16", description=__doc__.splitlines()[0])
    parser.add_argument("--kernels", default="bookworm trixie", help="kernel sets built by make guest")
    parser.add_argument("--repeat", type=int, default=3, help="boots per kernel set and variant")
    parser.add_argument("--out", type=Path, default=Path("results/findings/idio16-regmap-irq"))
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    return trio.run(run_all, args.kernels.split(), args.repeat, args.out)


if __name__ == "__main__":
    sys.exit(main())
