"""Every kind of kernel report ends a guest run as a kernel problem, at once and with its context.

A real guest that hits ``kernel BUG at …`` under ``oops=panic`` powers off;
one that hangs (a stalled task, an RCU stall) goes quiet.  Either way the run
must end with :class:`GuestKernelError` carrying the lines around the first
report, not wait out its timeout.  The "QEMU" here is a shell script that
prints a console the way a guest does and then hangs, so each pattern is fed
exactly as a kernel prints it.
"""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from vdev.qemu.guest import (
    KERNEL_PROBLEM,
    KERNEL_PROBLEM_PATTERNS,
    PANIC_ON_PROBLEM,
    GuestKernelError,
    GuestMachine,
    kernel_problem_kinds,
)

#: One line per pattern, as kernels print them.
REPORTS = {
    "bug": "[   12.345678] BUG: KFENCE: out-of-bounds read in vfio_pci_mmap_fault+0x3c/0x1a0",
    "kernel-bug-at": "[    3.141592] kernel BUG at mm/memory.c:2402!",
    "warning": "[    1.000000] WARNING: CPU: 1 PID: 57 at drivers/vfio/pci/vfio_pci_core.c:1700 vfio_pci_mmap_fault",
    "oops": "[    1.500000] Oops: 0010 [#1] PREEMPT SMP NOPTI",
    "invalid-opcode": "[    3.141600] invalid opcode: 0000 [#1] SMP NOPTI",
    "panic": "[    4.000000] Kernel panic - not syncing: Fatal exception",
    "general-protection": "[    2.0] general protection fault, probably for non-canonical address 0xdead000000000100",
    "unable-to-handle": "[    1.0] Unable to handle kernel paging request at virtual address dead000000000108",
    "oom-leaked": "[    5.0] Huh VM_FAULT_OOM leaked out to the #PF handler. Retrying PF",
    "hung-task": "[  245.1] INFO: task mse-fault:93 blocked for more than 120 seconds.",
    "rcu-stall": "[   30.0] rcu: INFO: rcu_sched self-detected stall on CPU",
    "list-corruption": "[    1.0] list_del corruption, ffff888004a1c2d0->next is LIST_POISON1 (dead000000000100)",
    "ubsan": "[    1.0] UBSAN: array-index-out-of-bounds in drivers/gpio/gpio-idio-16.c:120:3",
    "kasan": "[    1.0] KASAN: null-ptr-deref in range [0x0000000000000008-0x000000000000000f]",
}

MORE = [
    "[   31.0] rcu: INFO: rcu_preempt detected stalls on CPUs/tasks:",
    "[    1.0] list_add corruption. prev->next should be next (ffff8880), but was ffff8881. (prev=ffff8882).",
    "[    1.0] BUG: soft lockup - CPU#0 stuck for 22s! [mse-fault:91]",
]

QUIET = [
    "[    0.1] rcu: Hierarchical RCU implementation.",
    "[    0.2] vfio-pci 0000:00:03.0: enabling device (0000 -> 0002)",
    "[    0.3] INFO: task scheduling enabled",
    "[    0.4] Bugs fixed: none",
    "[    0.5] list_add_tail done",
    'VDEV {"kind": "mse.epoch", "state": "disabled"}',
]


def test_every_pattern_has_a_sample_line() -> None:
    assert set(REPORTS) == set(KERNEL_PROBLEM_PATTERNS)


@pytest.mark.parametrize("kind", sorted(REPORTS))
def test_each_report_is_recognised_by_its_own_pattern(kind: str) -> None:
    assert kind in kernel_problem_kinds([REPORTS[kind]])


@pytest.mark.parametrize("line", MORE)
def test_other_forms_of_the_same_reports_are_recognised(line: str) -> None:
    assert KERNEL_PROBLEM.search(line)


@pytest.mark.parametrize("line", QUIET)
def test_ordinary_console_lines_are_not_problems(line: str) -> None:
    assert not KERNEL_PROBLEM.search(line)


def fake_qemu(tmp_path: Path, lines: list[str], *, then: str = "exec sleep 1000") -> Path:
    """A "QEMU" printing ``lines`` on its console (stdout), then doing ``then``."""
    console = tmp_path / "console.txt"
    console.write_text("".join(f"{line}\n" for line in lines))
    script = tmp_path / "qemu.sh"
    script.write_text(f"#!/bin/sh\ncat '{console}'\n{then}\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


def machine(tmp_path: Path, binary: Path, **options: object) -> GuestMachine:
    (tmp_path / "kernel").write_bytes(b"")
    (tmp_path / "initrd").write_bytes(b"")
    return GuestMachine(
        kernel=tmp_path / "kernel",
        initrd=tmp_path / "initrd",
        binary=binary,
        workdir=tmp_path / "run",
        timeout=600,
        **options,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize("kind", sorted(REPORTS))
async def test_a_kernel_report_ends_a_hung_run_at_once_with_the_lines_around_it(tmp_path: Path, kind: str) -> None:
    before = [f"[    0.{n}] booting step {n}" for n in range(12)]
    after = ["[    9.0] Call Trace:", "[    9.1]  <TASK>", "[    9.2] ---[ end trace 0000000000000000 ]---"]
    binary = fake_qemu(tmp_path, [*before, REPORTS[kind], *after, "[    9.3] after the report"])

    with pytest.raises(GuestKernelError) as caught:
        async with machine(tmp_path, binary) as vm:
            await vm.expect("never.reported")

    error = caught.value
    # Ended by the problem, not by the 600 s machine timeout (which would be the cause).
    assert error.__cause__ is None
    assert kind in error.kinds
    assert error.problems == [REPORTS[kind]]
    assert error.report == [*before[-10:], REPORTS[kind], *after]
    assert REPORTS[kind] in str(error) and "Call Trace:" in str(error)
    assert vm.returncode is not None  # QEMU was stopped


async def test_without_an_end_marker_the_run_ends_after_the_grace_time(tmp_path: Path) -> None:
    binary = fake_qemu(tmp_path, ["[ 1.0] start", REPORTS["hung-task"], "[ 1.1] schedule+0x5/0x9"])
    with pytest.raises(GuestKernelError) as caught:
        async with machine(tmp_path, binary, problem_grace=0.2) as vm:
            await vm.expect("never.reported")
    assert caught.value.__cause__ is None
    assert caught.value.report == ["[ 1.0] start", REPORTS["hung-task"], "[ 1.1] schedule+0x5/0x9"]


async def test_a_guest_that_panics_and_exits_reports_the_kernel_problem_not_its_exit(tmp_path: Path) -> None:
    lines = ["[ 1.0] start", REPORTS["kernel-bug-at"], REPORTS["invalid-opcode"], REPORTS["panic"]]
    binary = fake_qemu(tmp_path, lines, then="exit 0")
    with pytest.raises(GuestKernelError) as caught:
        async with machine(tmp_path, binary) as vm:
            await vm.expect("never.reported")
    assert caught.value.kinds == ["kernel-bug-at", "invalid-opcode", "panic"]
    assert caught.value.report == lines


async def test_without_check_kernel_problems_are_recorded_and_the_run_goes_on(tmp_path: Path) -> None:
    binary = fake_qemu(tmp_path, [REPORTS["warning"], 'VDEV {"kind": "after"}'], then="exit 0")
    async with machine(tmp_path, binary, check_kernel=False) as vm:
        await vm.expect("after")
        await vm.wait_exit()
    assert vm.kernel_problems == [REPORTS["warning"]]


def test_guests_panic_on_warnings_and_oopses_unless_asked_not_to(tmp_path: Path) -> None:
    assert PANIC_ON_PROBLEM in machine(tmp_path, Path("qemu")).append
    assert PANIC_ON_PROBLEM not in machine(tmp_path, Path("qemu"), panic_on_problem=False).append
