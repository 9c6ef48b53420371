"""The fault matrix of ``make experiment``: its cells and the table it builds from recorded runs.

The recorded runs are the evidence kept in the repository (issue 18's
BAR-size runs and the prefault-at-enable runs), so the table is checked
against numbers measured on real kernels, not made up.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vdev_experiments.mse import FAULT_MATRIX, PREFAULT_PATCH, fault_matrix_markdown, fault_matrix_table

EVIDENCE = Path(__file__).resolve().parents[2] / "docs" / "evidence"


def _recorded(*folders: str) -> list[dict[str, Any]]:
    runs: list[dict[str, Any]] = []
    for folder in folders:
        runs += json.loads((EVIDENCE / folder / "experiment.json").read_text())["runs"]
    return runs


def test_the_table_gives_faults_per_enable_per_kernel_size_alignment_and_variant_from_recorded_runs() -> None:
    sizes = [f"zap-paths-2026-11-26/sizes/{name}" for name in ("4K-aligned", "2M-aligned", "2M-misaligned")]
    sizes += [f"zap-paths-2026-11-26/sizes/{name}" for name in ("1G-aligned", "1G-misaligned-keep")]
    table = fault_matrix_table(_recorded(*sizes, "prefault-2026-11-26/stock", "prefault-2026-11-26/prefault"))
    cells = {(r["kernel"], r["size"], r["alignment"], r["variant"]): r for r in table}
    assert len(cells) == len(table)  # one row per kernel, size, alignment and variant here
    prefault = PREFAULT_PATCH.stem
    # 6.1 maps the whole vma at the first fault, whatever the size or alignment.
    for size, alignment in [("4K", "aligned"), ("2M", "aligned"), ("2M", "misaligned"), ("1G", "aligned")]:
        assert cells["bookworm", size, alignment, "stock"]["faults_median"] == 1
    assert cells["bookworm", "4M", "aligned", "stock"]["faults_median"] == 1
    # 6.12 faults one huge page at a time when aligned, one 4 KiB page at a time when not.
    assert cells["trixie", "2M", "aligned", "stock"]["faults_median"] == 1
    assert cells["trixie", "2M", "misaligned", "stock"]["faults_median"] == 512
    assert cells["trixie", "1G", "misaligned", "stock"]["faults_median"] == 262144
    assert cells["trixie", "1G", "misaligned", "stock"]["membar_mapping"] == "keep"
    # The prefault variant has mapped everything before the first touch: 0, pooled over its 3 runs.
    row = cells["bookworm", "4M", "aligned", prefault]
    assert (row["faults_median"], row["faults_min"], row["faults_max"]) == (0, 0, 0)
    assert (row["runs"], row["passed"], row["enables"]) == (3, 3, 18)
    assert row["first_touch_us_median"] is not None and row["pages"] == 1024
    # The 4 KiB runs failed verdicts (the fork phase read past a one-page BAR): the table says so.
    assert cells["bookworm", "4K", "aligned", "stock"]["passed"] == 0
    markdown = fault_matrix_markdown(table)
    assert (
        "| trixie (6.12.117+deb13-amd64) | 1G, 262144 pages | misaligned | keep | stock | 262144 (262144–262144) |"
        in markdown
    )
    assert f"| {prefault} | 0 (0–0) | 18 |" in markdown


def test_a_cell_with_a_different_membar_policy_or_a_run_that_measured_nothing_is_its_own_row() -> None:
    revoked, kept = _recorded(
        "zap-paths-2026-11-26/sizes/1G-misaligned", "zap-paths-2026-11-26/sizes/1G-misaligned-keep"
    )[1::2]
    assert (revoked["kernel"], kept["kernel"]) == ("trixie", "trixie")
    cut_short = {**revoked, "faults_per_enable": [], "first_touch_ns": {"quiet": []}, "passed": False}
    table = fault_matrix_table([revoked, kept, cut_short])
    assert [(r["membar_mapping"], r["runs"], r["passed"], r["enables"]) for r in table] == [
        ("revoke", 2, 0, 2),  # the revoke run QEMU's timeout ended after two enables, and the one cut short
        ("keep", 1, 1, 4),
    ]
    assert "none measured" in fault_matrix_markdown(fault_matrix_table([cut_short]))


def test_the_matrix_boots_are_quiet_enables_only_and_the_prefault_variant_runs_on_6_1_only() -> None:
    for cell in FAULT_MATRIX:
        config = cell.config("root-port")
        assert (config.cycles, config.latency_cycles, config.storm_cycles, config.threads) == (1, 4, 0, 2)
        assert not (config.reset or config.fork or config.d3hot or config.hot_reset or config.close)
        assert config.guest_command().endswith("-R -F -D -H -C")
    sizes = {(cell.size, cell.misaligned) for cell in FAULT_MATRIX if not cell.prefault}
    assert {("4K", False), ("2M", False), ("2M", True), ("1G", False), ("1G", True)} <= sizes
    [prefault] = [cell for cell in FAULT_MATRIX if cell.prefault]
    assert prefault.applies_to("6.1.0-50-amd64") and not prefault.applies_to("6.12.117+deb13-amd64")
    assert PREFAULT_PATCH.is_file()
