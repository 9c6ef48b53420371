"""Reproduce finding 6 of docs/findings.md: vfio-pci 6.1's zap races munmap on the same vma.

Usage (from the repository root, after ``make guest KERNELS=...``)::

    make finding-munmap-race KERNELS="bookworm bookworm-security trixie" REPEAT=30
    python -m tools.findings.munmap_race --kernels bookworm --repeat 30 --out results/findings/munmap-race

Each repeat boots the kernel set once with vdev's ``membar`` device (BAR0 of
``--size``) and 2 vCPUs, and runs ``guest/munmap-race.c`` (compiled here,
statically, and copied in): ``--threads`` threads map BAR0, touch it and
unmap it while the main thread clears and sets COMMAND.MEM ``--cycles``
times.  The race hits in some boots only, so nothing here asserts an
outcome: each boot is classified from its console and the tally printed.

An outcome is the first kernel problem the console shows (``BUG: Bad page
map``, the ``untrack_pfn`` warning, or any other ``BUG:``/``WARNING:``/oops
line) with the first vfio-pci or munmap frame of its call trace, else
``clean`` when the program printed ``race.done`` with status 0, else
``no-result``.

Written to ``--out``: ``outcomes.txt`` (one line per boot), ``outcomes.json``
(the same with the provenance of each kernel set and the settings) and
``console/<set>-<n>.log.gz`` (every boot's console).  Sets already in
``outcomes.json`` and not run again are kept; a set run again replaces its
entry there (``outcomes.txt`` keeps every line).  Exit status 0 unless a
boot ended in ``no-result``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from vdev.provenance import collect
from vdev.qemu.guest import KERNEL_PROBLEM, GuestArtefacts, kernel_call_trace

SOURCE = Path(__file__).resolve().parents[2] / "guest" / "munmap-race.c"
#: Call-trace functions that say which side was tearing the mapping down: vfio-pci's zap, or munmap.
SIDES = ("vfio_pci_zap_and_vma_lock", "vfio_pci_zap_bars", "do_mas_align_munmap", "__vm_munmap")
DONE = re.compile(r'VDEV (\{"kind":"race\.done".*\})')
CLEAN = "clean"
NO_RESULT = "no-result"


@dataclass(frozen=True)
class Outcome:
    """One boot: its kind, the problem's first line and frame (if any), and the program's final report."""

    kind: str
    problem: str | None
    frame: str | None
    done: dict[str, object] | None


def kind_of(problem: str) -> str:
    """A short name for the kernel problems this race is known to end in; other problems keep their text."""
    if "Bad page map" in problem:
        return "bad-page-map"
    if "untrack_pfn" in problem:
        return "untrack-pfn-warning"
    return "other-problem"


def classify(console: str) -> Outcome:
    """The outcome of one boot, read from its console log."""
    lines = console.replace("\r", "").splitlines()
    done_match = next((m for m in map(DONE.search, lines) if m), None)
    done = json.loads(done_match.group(1)) if done_match else None
    for index, line in enumerate(lines):
        if KERNEL_PROBLEM.search(line):
            problem = re.sub(r"^\[[ \d.]+\] ", "", line).strip()
            frame = next((name for name in kernel_call_trace(lines[index:]) if name in SIDES), None)
            return Outcome(kind_of(problem), problem, frame, done)
    if done is not None and done.get("status") == 0:
        return Outcome(CLEAN, None, None, done)
    return Outcome(NO_RESULT, None, None, done)


def build(into: Path) -> Path:
    """Compile the guest program statically (the initramfs has no C library)."""
    binary = into / "munmap-race"
    subprocess.run(
        ["gcc", "-static", "-O2", "-Wall", "-Wextra", "-Werror=implicit-function-declaration",
         f"-I{SOURCE.parent}", "-o", str(binary), str(SOURCE)],
        check=True,
    )  # fmt: skip
    return binary


def boot(kernel: str, binary: Path, args: argparse.Namespace, workdir: Path) -> str:
    """One guest boot running the program; returns its console log."""
    command = [
        sys.executable, "-m", "vdev", "guest", "--kernel", kernel,
        "--device", "membar", "--param", f"size={args.size}", "--smp", "2",
        "--copy", str(binary), "--workdir", str(workdir),
        "--run", f"/root/munmap-race -t {args.threads} -c {args.cycles}",
    ]  # fmt: skip
    subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    log = workdir / "console.log"
    return log.read_bytes().decode(errors="replace") if log.exists() else ""


def describe(name: str, outcome: Outcome) -> str:
    """One line of outcomes.txt."""
    if outcome.problem is not None:
        return f"{name} | {outcome.kind} | {outcome.problem} | via {outcome.frame}"
    return f"{name} | {outcome.kind} | {json.dumps(outcome.done)}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernels", default="bookworm", help="kernel sets of `make guest`, space-separated")
    parser.add_argument("--repeat", type=int, default=30, help="boots per kernel set")
    parser.add_argument("--size", default="4M", help="membar's BAR0 size")
    parser.add_argument("--threads", type=int, default=4, help="threads mapping and unmapping BAR0")
    parser.add_argument("--cycles", type=int, default=2000, help="MEM off/on cycles per boot")
    parser.add_argument("--out", type=Path, default=Path("results/findings/munmap-race"))
    args = parser.parse_args(argv)

    (args.out / "console").mkdir(parents=True, exist_ok=True)
    recorded = args.out / "outcomes.json"
    # Kernel sets recorded before and not run now are kept, so runs can be added one set at a time.
    report: dict[str, dict[str, object]] = json.loads(recorded.read_text()) if recorded.exists() else {}
    settings = {"size": args.size, "threads": args.threads, "cycles": args.cycles, "smp": 2}
    failed = False
    with tempfile.TemporaryDirectory(prefix="munmap-race-") as temporary, (args.out / "outcomes.txt").open("a") as text:
        binary = build(Path(temporary))
        for kernel in args.kernels.split():
            provenance = collect(GuestArtefacts.find(kernel)).to_json()
            runs = []
            for n in range(1, args.repeat + 1):
                name = f"{kernel}-{n}"
                workdir = Path(temporary) / name
                workdir.mkdir()
                started = time.monotonic()
                console = boot(kernel, binary, args, workdir)
                outcome = classify(console)
                with gzip.open(args.out / "console" / f"{name}.log.gz", "wt") as kept:
                    kept.write(console)
                shutil.rmtree(workdir)
                failed |= outcome.kind == NO_RESULT
                runs.append({"boot": n, "seconds": round(time.monotonic() - started, 1), **asdict(outcome)})
                print(describe(name, outcome), file=text, flush=True)
                print(describe(name, outcome), flush=True)
            tally = Counter(run["kind"] for run in runs)
            report[kernel] = {"settings": settings, "provenance": provenance, "tally": dict(tally), "runs": runs}
            hit = args.repeat - tally[CLEAN] - tally[NO_RESULT]
            print(f"{kernel} ({provenance['kernel_package_version']}): {hit} of {args.repeat} boots ended in a "
                  f"kernel problem: {dict(tally)}")  # fmt: skip
            recorded.write_text(json.dumps(report, indent=1) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
