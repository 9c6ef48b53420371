"""The fault matrix of ``make experiment``: its cells and the table it builds from recorded runs.

The recorded runs are the evidence kept in the repository (issue 18's
BAR-size runs and the prefault-at-enable runs), so the table is checked
against numbers measured on real kernels, not made up.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vdev.provenance import Provenance
from vdev_experiments.mse import (
    FAULT_MATRIX,
    PREFAULT_PATCH,
    MatrixCell,
    MseRun,
    ServerLog,
    Verdict,
    fault_matrix_markdown,
    fault_matrix_table,
    markdown_summary,
    write_report,
)

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


def _matrix_run(cell: MatrixCell, faults: list[int]) -> MseRun:
    provenance = Provenance(
        vdev_commit="abc",
        vdev_version="0.1.0",
        qemu_package_version="1:11.1.3",
        qemu_version="QEMU emulator version 11.1.3",
        libvfio_user_revision="0b28d205",
        kernel_name="bookworm",
        kernel_package="linux-image-6.1.0-50-amd64",
        kernel_package_version="6.1.176-1",
        kernel_release="6.1.0-50-amd64",
        kernel_patch=PREFAULT_PATCH.name if cell.prefault else None,
    )
    latency = [
        {
            "kind": "mse.latency",
            "first_touch_ns": 1000 * (n + 1),
            "walk_ns": 5000,
            "walk_mapped_ns": 1000,
            "faults_first_touch": min(n, 1),
            "faults_walk": max(n - 1, 0),
        }
        for n in faults
    ]
    return MseRun(
        kernel="bookworm",
        release="6.1.0-50-amd64",
        config=cell.config("root-port"),
        results=[{"kind": "mse.device", "pages": 1024}, *latency],
        server=ServerLog(),
        verdicts=[Verdict("completed", True, "")],
        console_log=Path("console.log"),
        boot_seconds=None,
        seconds=1.0,
        provenance=provenance,
    )


def test_the_report_carries_the_matrix_in_its_json_and_its_markdown(tmp_path: Path) -> None:
    stock, prefault = MatrixCell("4M"), MatrixCell("4M", prefault=True)
    matrix = [_matrix_run(stock, [1, 1, 2]), _matrix_run(prefault, [0, 0, 0])]
    document = write_report([], tmp_path / "experiment.json", plot=None, matrix=matrix, matrix_seconds=42.4)
    recorded = json.loads((tmp_path / "experiment.json").read_text())["fault_matrix"]
    assert recorded == json.loads(json.dumps(document["fault_matrix"]))
    assert recorded["seconds"] == 42.4 and len(recorded["runs"]) == 2
    rows = {row["variant"]: row for row in recorded["table"]}
    assert (rows["stock"]["faults_median"], rows["stock"]["faults_max"], rows["stock"]["enables"]) == (1, 2, 3)
    assert rows[PREFAULT_PATCH.stem]["faults_max"] == 0
    summary = markdown_summary([], matrix=matrix, matrix_seconds=42.4)
    assert "2 boots in 42 s" in summary
    assert f"| {PREFAULT_PATCH.stem} | 0 (0–0) | 3 |" in summary
    assert "faults per enable" not in markdown_summary([])  # no matrix, no table
