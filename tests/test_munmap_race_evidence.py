"""Finding 6's recorded evidence says what its consoles say.

docs/findings.md §6 counts boots by the outcome tools/findings/munmap_race.py
gave each one.  The race hits in some boots only, so no test boots a guest
to assert it; instead these check, without a guest, that every recorded
outcome is what the classifier reads in the console kept beside it — so a
count in the finding cannot drift from its evidence, and a classifier change
that would miscount is caught.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from tools.findings.munmap_race import CLEAN, NO_RESULT, classify

EVIDENCE = Path(__file__).resolve().parent.parent / "docs" / "evidence" / "vfio-pci-6.1-munmap-race"
RECORDS = sorted(EVIDENCE.glob("*/outcomes.json"))


def recorded_boots() -> list[tuple[str, str, dict[str, object]]]:
    """(folder, kernel set, run) for every boot recorded under the evidence folder."""
    boots = []
    for record in RECORDS:
        for kernel, entry in json.loads(record.read_text()).items():
            boots.extend((record.parent.name, kernel, run) for run in entry["runs"])
    return boots


@pytest.mark.parametrize(("folder", "kernel", "run"), recorded_boots(), ids=lambda value: str(value)[:40])
def test_each_recorded_outcome_is_what_its_console_shows(folder: str, kernel: str, run: dict[str, object]) -> None:
    console = gzip.decompress((EVIDENCE / folder / "console" / f"{kernel}-{run['boot']}.log.gz").read_bytes())
    outcome = classify(console.decode(errors="replace"))
    assert (outcome.kind, outcome.problem, outcome.frame) == (run["kind"], run["problem"], run["frame"])


def test_the_tally_counts_the_runs() -> None:
    for record in RECORDS:
        for kernel, entry in json.loads(record.read_text()).items():
            kinds = [run["kind"] for run in entry["runs"]]
            assert entry["tally"] == {kind: kinds.count(kind) for kind in set(kinds)}, (record, kernel)
            assert NO_RESULT not in kinds, (record, kernel)


def test_stock_6_1_176_ended_in_the_race_and_6_12_never_did() -> None:
    """The finding's two headline counts, as recorded: stock 6.1.176-1 hit, 6.12.117-1 stayed clean."""
    stock = json.loads((EVIDENCE / "stock" / "outcomes.json").read_text())["bookworm"]
    assert stock["provenance"]["kernel_package_version"] == "6.1.176-1"
    assert {run["kind"] for run in stock["runs"]} - {CLEAN} <= {"untrack-pfn-warning", "bad-page-map"}
    assert sum(run["kind"] != CLEAN for run in stock["runs"]) > 0
    control = json.loads((EVIDENCE / "controls" / "outcomes.json").read_text())["trixie"]
    assert control["provenance"]["kernel_package_version"] == "6.12.117-1"
    assert {run["kind"] for run in control["runs"]} == {CLEAN}
