"""Positive controls: known vfio-pci bugs put back into Debian 6.1 make the experiment's verdicts fire.

The patches in ``controls/`` (read them: each says what it changes and what
must follow) are built out of tree from Debian's source and headers at the
bookworm set's version and loaded in place of the stock ``vfio-pci-core``
(``run_mse(patch=...)``, as ``make experiment PATCH=...``).  A verdict that
stays green with its bug present would prove nothing; these runs prove the
two that matter most here can go red.  The stock module passes the same run
(same ``CONFIG``) in ``test_mse_fault.py``.

The first run builds the modules: about a minute from a clean cache
(downloading ``linux-source-6.1`` and the headers, unpacking
``drivers/vfio/pci``, compiling), then cached by package version and patch.
"""

from __future__ import annotations

from pathlib import Path

from vdev.qemu.guest import GuestArtefacts
from vdev_experiments.mse import MseConfig, MseRun, run_mse

CONTROLS = Path(__file__).resolve().parents[2] / "controls"
#: The stock module's run in test_mse_fault.py, sized for CI.
CONFIG = MseConfig(mode="guest", threads=4, cycles=4, period_ms=20, latency_cycles=3, storm_cycles=40)


def explain(run: MseRun) -> str:
    lines = [f"{'ok  ' if v.passed else 'FAIL'} {v.name}: {v.detail}" for v in run.verdicts]
    return "\n".join([*lines, *run.kernel_report, f"console log: {run.console_log}"])


async def test_the_2021_concurrent_fault_bug_ends_the_run_with_the_kernels_bug(
    bookworm: GuestArtefacts, qemu_binary: Path, tmp_path: Path
) -> None:
    patch = CONTROLS / "vfio-pci-6.1-concurrent-fault.diff"
    run = await run_mse(bookworm, CONFIG, workdir=tmp_path, binary=qemu_binary, patch=patch)
    print(explain(run))

    verdicts = {verdict.name: verdict for verdict in run.verdicts}
    assert not verdicts["completed"].passed and "ended by a kernel problem" in verdicts["completed"].detail
    assert "kernel BUG at mm/memory.c" in verdicts["kernel_clean"].detail, explain(run)
    # The fault handler remapped a populated vma: the BUG is in its remap, called from vfio-pci's fault.
    assert any("vfio_pci_mmap_fault" in line for line in run.kernel_report), explain(run)
    assert run.provenance.kernel_patch == patch.name
    assert run.provenance.kernel_package_version == bookworm.package_version


async def test_the_fork_escape_fails_fork_mapped_child_and_nothing_else(
    bookworm: GuestArtefacts, qemu_binary: Path, tmp_path: Path
) -> None:
    patch = CONTROLS / "vfio-pci-6.1-fork-no-zap.diff"
    run = await run_mse(bookworm, CONFIG, workdir=tmp_path, binary=qemu_binary, patch=patch)
    print(explain(run))

    assert [verdict.name for verdict in run.verdicts if not verdict.passed] == ["fork_mapped_child"], explain(run)
    mapped = next(child for child in run.report.forks if child["forked"] == "mapped")
    assert mapped["inherited_disabled"] == "ok"  # the child read the BAR while MEM was off
    assert run.provenance.kernel_patch == patch.name
