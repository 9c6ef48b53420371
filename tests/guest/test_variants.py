"""Variants: vfio-pci changes proposed upstream, measured by the experiment (``variants/``).

Unlike the controls, a variant is not expected to break anything: it is a
design to compare with the stock module.  The prefault-on-enable patch maps
every vma a zap emptied at the enabling COMMAND write, so the first access
after an enable must take no fault at all, where the stock 6.1 module takes
one per vma (``test_mse_fault.py`` runs the stock module through the same
``CONFIG``).  The patched modules are built as the controls' are
(``test_controls.py``) and cached per patch.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from vdev.qemu.guest import GuestArtefacts
from vdev_experiments.mse import MseConfig, MseRun, faults_per_enable, run_mse

VARIANTS = Path(__file__).resolve().parents[2] / "variants"
#: The controls' run (test_controls.py), sized for CI.
CONFIG = MseConfig(mode="guest", threads=4, cycles=4, period_ms=20, latency_cycles=3, storm_cycles=40)


def explain(run: MseRun) -> str:
    lines = [f"{'ok  ' if v.passed else 'FAIL'} {v.name}: {v.detail}" for v in run.verdicts]
    faults = [(e["faults_first_touch"], e["faults_walk"]) for e in run.report.latency]
    return "\n".join(
        [*lines, *run.kernel_report, f"faults (first touch, walk): {faults}", f"console: {run.console_log}"]
    )


@pytest.mark.requires("libvfio-user")
async def test_prefault_on_enable_takes_no_fault_after_an_enable_and_passes_every_verdict(
    bookworm: GuestArtefacts, qemu_binary: Path, tmp_path: Path
) -> None:
    patch = VARIANTS / "vfio-pci-6.1-prefault-on-enable.diff"
    run = await run_mse(bookworm, CONFIG, workdir=tmp_path, binary=qemu_binary, patch=patch)
    print(explain(run))

    assert run.passed, explain(run)
    assert run.provenance.kernel_patch == patch.name
    # Every quiet enable: BAR0's first touch and the walk of its other pages found it mapped already.
    assert len(run.report.latency) == CONFIG.latency_cycles, explain(run)
    assert faults_per_enable(run.report.latency) == [0] * CONFIG.latency_cycles, explain(run)
