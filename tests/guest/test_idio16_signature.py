"""The idio16 edge test's judge, without a guest: what counts as the known regmap-irq NULL call and what does not.

The report below is the console of a Debian 6.12.117-1 guest running the
trigger of tools/findings/idio16.py (a run like those in
docs/evidence/idio16-regmap-irq/console/trixie.txt), a few register lines
left out.  Each
variant changes one thing a different bug would change, and must no longer
count as the known one — so the guest test fails on it instead of passing.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.guest.idio16_edges import Outcome, is_regmap_irq_null_call, recorded_outcome
from vdev.qemu.guest import GuestArtefacts, GuestKernelError, kernel_call_trace, kernel_problem_kinds, kernel_rip

REPORT = """\
VDEV {"kind":"gpio.waiting","lines":[20]}
[    4.312317] BUG: kernel NULL pointer dereference, address: 0000000000000000
[    4.312689] #PF: supervisor instruction fetch in kernel mode
[    4.312766] #PF: error_code(0x0010) - not-present page
[    4.312879] PGD 564a067 P4D 564a067 PUD 55b5067 PMD 0
[    4.313233] Oops: Oops: 0010 [#1] PREEMPT SMP NOPTI
[    4.313615] CPU: 0 UID: 0 PID: 171 Comm: irq/20-0000:00: Not tainted 6.12.117+deb13-amd64 #1  Debian 6.12.117-1
[    4.313880] Hardware name: QEMU Standard PC (Q35 + ICH9, 2009), BIOS 1.17.0-debian-1.17.0-1~bpo13+1 04/01/2014
[    4.314113] RIP: 0010:0x0
[    4.318897] Code: Unable to access opcode bytes at 0xffffffffffffffd6.
[    4.319044] RSP: 0018:ffffc900005cfdc8 EFLAGS: 00010286
[    4.319215] RDX: ffff888004139a00 RSI: 0000000000000000 RDI: 0000000000000000
[    4.320021] Call Trace:
[    4.320608]  <TASK>
[    4.320746]  handle_nested_irq+0x95/0xe0
[    4.322957]  regmap_irq_thread+0x206/0x680
[    4.323113]  irq_thread_fn+0x23/0x60
[    4.323163]  irq_thread+0x1a8/0x300
[    4.323214]  ? __pfx_irq_thread_fn+0x10/0x10
[    4.323364]  ? __pfx_irq_thread+0x10/0x10
[    4.323412]  kthread+0xd2/0x100
[    4.323457]  ? __pfx_kthread+0x10/0x10
[    4.323502]  ret_from_fork+0x34/0x50
[    4.323549]  ? __pfx_kthread+0x10/0x10
[    4.323593]  ret_from_fork_asm+0x1a/0x30
[    4.323703]  </TASK>
[    4.323848] Modules linked in: uio_pci_generic uio gpio_pci_idio_16 gpio_idio_16 gpio_regmap vfio_pci vfio_pci_core
[    4.324287] CR2: 0000000000000000
[    4.324696] ---[ end trace 0000000000000000 ]---""".splitlines()


def kernel_error(report: list[str]) -> GuestKernelError:
    problems = [line for line in report if kernel_problem_kinds([line])]
    return GuestKernelError("the guest kernel reported a problem", problems, report)


def replaced(old: str, new: str) -> list[str]:
    assert any(old in line for line in REPORT), old
    return [line.replace(old, new) for line in REPORT]


def test_the_report_is_read_as_a_call_through_null_from_regmap_irq_thread() -> None:
    assert kernel_rip(REPORT) == "0x0"
    assert kernel_call_trace(REPORT) == [
        "handle_nested_irq",
        "regmap_irq_thread",
        "irq_thread_fn",
        "irq_thread",
        "kthread",
        "ret_from_fork",
        "ret_from_fork_asm",
    ]
    assert kernel_error(REPORT).kinds == ["bug", "oops"]


def test_the_recorded_report_is_the_known_bug() -> None:
    assert is_regmap_irq_null_call(kernel_error(REPORT))


@pytest.mark.parametrize(
    ("what", "report"),
    [
        ("another caller", replaced("regmap_irq_thread+0x206/0x680", "pca953x_irq_handler+0x206/0x680")),
        ("a crash inside a function", replaced("RIP: 0010:0x0", "RIP: 0010:handle_nested_irq+0x95/0xe0")),
        ("a data access at a small address", replaced("address: 0000000000000000", "address: 0000000000000028")),
        ("not in an interrupt thread", replaced("Comm: irq/20-0000:00:", "Comm: gpio-lines")),
        (
            "a warning in the report",
            [*REPORT[:3], "[    4.3127] WARNING: CPU: 0 PID: 171 at kernel/irq/chip.c:1", *REPORT[3:]],
        ),
        ("no call trace", [line for line in REPORT if "+0x" not in line]),
    ],
)
def test_a_report_that_differs_in_one_way_is_not_the_known_bug(what: str, report: list[str]) -> None:
    assert not is_regmap_irq_null_call(kernel_error(report)), what


def test_problems_after_the_first_report_do_not_change_the_verdict() -> None:
    # A guest left running after the oops may oops again as the dead interrupt thread exits (seen on 7.2.13).
    later = "[    9.342409] BUG: unable to handle page fault for address: ffffffff813c0122"
    error = GuestKernelError("problem", [*kernel_error(REPORT).problems, later], REPORT)
    assert is_regmap_irq_null_call(error)


def artefacts(version: str) -> GuestArtefacts:
    return GuestArtefacts(
        name="trixie",
        kernel=Path("vmlinux"),
        bzimage=Path("bzImage"),
        initrd=Path("initramfs.cpio.gz"),
        release="6.12.117+deb13-amd64",
        package="linux-image-6.12.117+deb13-amd64",
        package_version=version,
        modules=(),
    )


def test_the_expected_outcome_is_what_every_recorded_run_of_the_package_showed(tmp_path: Path) -> None:
    evidence = tmp_path / "outcomes.json"
    kernels = {
        "linux-image-6.12.117+deb13-amd64=6.12.117-1": {"repeats": 5, "one_line": {"regmap-irq-null-call": 5}},
        "linux-image-6.12.117+deb13-amd64=6.12.117-2": {
            "repeats": 5,
            "one_line": {"regmap-irq-null-call": 4, "edge": 1},
        },
        "linux-image-6.12.117+deb13-amd64=6.12.117-3": {
            "repeats": 5,
            "one_line": {"regmap-irq-null-call": 4, "other": 1},
        },
    }
    evidence.write_text(json.dumps({"kernels": kernels}))
    assert recorded_outcome(artefacts("6.12.117-1"), evidence) is Outcome.NULL_CALL
    assert recorded_outcome(artefacts("6.12.117-2"), evidence) is None  # mixed: no expectation
    assert recorded_outcome(artefacts("6.12.117-3"), evidence) is None  # not every run ended known
    assert recorded_outcome(artefacts("6.12.200-1"), evidence) is None  # not recorded
