"""Fault experiments against Linux's ``nvme`` driver: each scenario one guest boot, the driver's reaction from dmesg.

Every scenario runs the same way.  (The controller's event log and
command statistics are cleared when the guest is ready, so they hold what
happened from the fault on.)  The guest writes a 4 MiB pattern to
``/dev/nvme0n1`` (namespace 1), reports ``nvme.ready`` and then polls a
mailbox: the first block of namespace 2, read with O_DIRECT from CPU 1.
The test installs the scenario's fault plan (rules that match namespace 1
only, so the mailbox keeps working) and writes ``GO`` into the mailbox's
backing store.  The guest runs its steps — ``dd`` with O_DIRECT, pinned to
CPU 0, so to I/O queue 1 and MSI-X vector 1 — each reported with its exit
status, then every dmesg line about nvme or I/O errors.

``nvme_core.io_timeout=4`` makes the driver's timeout handling (abort,
poll, reset) happen within seconds.  What is asserted is what the driver
did (its messages, the commands and resets the controller saw), that data
the guest saw acknowledged reads back intact, and that the controller kept
serving: every scenario ends with a verified read and a clean shutdown.
``docs/nvme-faults.md`` tabulates the outcomes per kernel.  With
``VDEV_NVME_EVIDENCE=DIR`` each run also leaves its record in
``DIR/<kernel release>/<scenario>-<n>``: ``summary.json`` (the guest's
reports, the controller's events) and the gzipped console log.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

from vdev.model.events import CommandChange, FaultInjected, Violation
from vdev.model.faults import DeviceFault, DeviceFaultPlan
from vdev.qemu.guest import GuestArtefacts, GuestMachine, GuestResult
from vdev.testing import served, vfio_user_pci
from vdev_devices.nvme import Nvme
from vdev_devices.nvme.events import NvmeEvent
from vdev_devices.nvme.spec import IoOpcode

pytestmark = pytest.mark.requires("libvfio-user")

MiB = 1 << 20
IO_TIMEOUT = 4
NAMESPACE_1 = {"nsid": 1}

PRELUDE = r"""
report() { printf 'VDEV {"kind":"%s"%s}\n' "$1" "${2:+,$2}"; }
# Block devices by NSID: 6.12 scans namespaces in parallel, so nvme0n1 need not be namespace 1.
for disk in /sys/block/nvme0n*; do
    case "$(cat "$disk/nsid")" in 1) ns1=/dev/${disk##*/} ;; 2) ns2=/dev/${disk##*/} ;; esac
done
json() { printf '%s' "$1" | sed -e 's/\\/\\\\/g' -e 's/"/\\"/g' | tr -d '\r\n\t'; }
# Wait for the test's GO in the first block of namespace 2.
go() {
    while [ "$(taskset -c 1 dd if="$ns2" bs=512 count=1 iflag=direct 2>/dev/null | head -c 2)" != GO ]; do
        usleep 20000
    done
}
# step NAME COMMAND...: run it, report its exit status, duration and error output.
step() {
    name=$1; shift
    start=$(cut -d' ' -f1 /proc/uptime)
    "$@" 2>/tmp/step.err; status=$?
    seconds=$(awk -v a="$start" -v b="$(cut -d' ' -f1 /proc/uptime)" 'BEGIN {print b - a}')
    error=$(json "$(cat /tmp/step.err)")
    report nvme.step "\"name\":\"$name\",\"status\":$status,\"seconds\":$seconds,\"stderr\":\"$error\""
}
# write FILE BYTES BS: FILE's first BYTES to the start of namespace 1, from CPU 0.
write() { taskset -c 0 dd if="$1" of="$ns1" bs="$3" count=$(($2 / $3)) oflag=direct conv=notrunc; }
# read BYTES BS: the start of namespace 1 into /tmp/back, from CPU 0.
read_back() { taskset -c 0 dd if="$ns1" of=/tmp/back bs="$2" count=$(($1 / $2)) iflag=direct; }
# verify FILE BYTES: namespace 1 starts with FILE's first BYTES.
verify() {
    bs=65536; [ "$2" -lt $bs ] && bs=$2
    read_back "$2" $bs 2>/dev/null && head -c "$2" "$1" | cmp - /tmp/back
}
dd if=/dev/urandom of=/tmp/data bs=1M count=4 2>/dev/null
dd if=/dev/urandom of=/tmp/data2 bs=1M count=4 2>/dev/null
dd if=/tmp/data of="$ns1" bs=1M count=4 oflag=direct 2>/dev/null
sectors=$(cat "/sys/block/${ns1##*/}/size")
report nvme.ready "\"sectors\":$sectors,\"ns1\":\"${ns1##*/}\",\"ns2\":\"${ns2##*/}\""
"""

EPILOGUE = r"""
dmesg | grep -E 'nvme|I/O error' | while IFS= read -r line; do report nvme.dmesg "\"line\":\"$(json "$line")\""; done
report nvme.end
"""


class Run:
    """What one scenario's guest reported, and what the controller saw."""

    def __init__(self, results: list[GuestResult], device: Nvme, release: str) -> None:
        self.release = release
        self.device = device
        #: The block device names of namespaces 1 and 2.
        self.ns1, self.ns2 = next((r["ns1"], r["ns2"]) for r in results if r.kind == "nvme.ready")
        self.steps = {r["name"]: r for r in results if r.kind == "nvme.step"}
        self.dmesg = [r["line"] for r in results if r.kind == "nvme.dmesg"]
        self.nvme_events = [e.fields() for e in device.events.of_kind(NvmeEvent)]

    def logged(self, pattern: str) -> list[str]:
        return [line for line in self.dmesg if re.search(pattern, line)]

    def summary(self) -> str:
        steps = ", ".join(f"{name}={r['status']} ({r['seconds']} s)" for name, r in self.steps.items())
        return f"{self.release}: {steps}\n  " + "\n  ".join(self.dmesg)


def keep_evidence(run: Run, artefacts: GuestArtefacts, scenario: str, machine: GuestMachine) -> None:
    """Store the run's record under ``$VDEV_NVME_EVIDENCE`` (see the module docstring)."""
    root = Path(os.environ["VDEV_NVME_EVIDENCE"]) / artefacts.release
    root.mkdir(parents=True, exist_ok=True)
    number = 1 + sum(1 for path in root.glob(f"{scenario}-*"))
    where = root / f"{scenario}-{number}"
    where.mkdir()
    record = {
        "scenario": scenario,
        "kernel": {"release": artefacts.release, "package_version": artefacts.package_version},
        "block_devices": {"1": run.ns1, "2": run.ns2},
        "steps": run.steps,
        "dmesg": run.dmesg,
        "controller": run.nvme_events,
        "faults": [e.fields() for e in run.device.events.of_kind(FaultInjected)],
    }
    (where / "summary.json").write_text(json.dumps(record, indent=1, default=lambda r: dict(r.data)) + "\n")
    with open(machine.console_log, "rb") as log, gzip.open(where / "console.log.gz", "wb") as packed:
        shutil.copyfileobj(log, packed)
    assert machine.workdir is not None
    shutil.rmtree(machine.workdir, ignore_errors=True)


async def run_scenario(
    qemu_binary: Path,
    artefacts: GuestArtefacts,
    socket_dir: Path,
    steps: str,
    plan: DeviceFaultPlan | None = None,
    *,
    act: Callable[[Nvme], None] | None = None,
    go: bool = True,
    scenario: str,
) -> Run:
    """Boot, wait for ``nvme.ready``, install ``plan`` (and call ``act``), say GO, collect the reports."""
    device = Nvme(size=64 * MiB, namespaces=2)
    socket = socket_dir / "nvme.sock"
    script = PRELUDE + ("go\n" if go else "") + steps + EPILOGUE
    machine = GuestMachine(
        binary=qemu_binary,
        kernel=artefacts.kernel,
        initrd=artefacts.initrd,
        devices=[vfio_user_pci(socket, addr="0x4")],
        files={"/vdev/fault.sh": script},
        run=["sh /vdev/fault.sh"],
        append=f"iommu=pt nvme_core.io_timeout={IO_TIMEOUT}",
        memory=512 * MiB,
        smp=2,
        timeout=240,
        workdir=tempfile.mkdtemp(prefix="vdev-nvme-") if "VDEV_NVME_EVIDENCE" in os.environ else None,
    )
    async with served(device, socket), machine as vm:
        await vm.expect("nvme.ready")
        device.events.clear()
        device.statistics.clear()
        if plan is not None:
            device.faults = plan
        if act is not None:
            act(device)
        if go:
            device.active_namespaces[2].write(0, b"GO".ljust(512, b"\0"))
        await vm.expect("nvme.end")
        await vm.wait_exit()
    run = Run(vm.results, device, artefacts.release)
    print(run.summary())
    if "VDEV_NVME_EVIDENCE" in os.environ:
        keep_evidence(run, artefacts, scenario, machine)
    # the controller kept serving: the guest shut it down cleanly at power-off
    assert any(e["what"] == "shutdown" for e in run.nvme_events), run.nvme_events[-5:]
    return run


def commands(device: Nvme, opcode: int) -> int:
    return sum(count for (qid, op), count in device.statistics.items() if qid and op == opcode)


async def test_a_write_that_never_completes_is_aborted_then_the_controller_reset(
    qemu_binary: Path, guest_artefacts: GuestArtefacts, vdev_socket_dir: Path
) -> None:
    """The write hangs and Abort does not reach it: timeout -> Abort -> second timeout -> reset -> retry."""
    plan = DeviceFaultPlan(
        [DeviceFault(on="nvme-command", action="hang", where={**NAMESPACE_1, "opcode": IoOpcode.WRITE}, count=1,
               params={"abortable": False})]
    )  # fmt: skip
    steps = "step write write /tmp/data2 4096 4096\nstep verify verify /tmp/data2 4096\n"
    run = await run_scenario(qemu_binary, guest_artefacts, vdev_socket_dir, steps, plan, scenario="hang-unabortable")

    assert run.steps["write"]["status"] == 0 and run.steps["verify"]["status"] == 0, run.summary()
    assert run.logged(r"I/O (tag )?\d+ .*QID 1 timeout, aborting"), run.summary()
    assert run.logged(r"I/O (tag )?\d+ .*QID 1 timeout, reset controller"), run.summary()
    whats = [e["what"] for e in run.nvme_events]
    abort = next(e for e in run.nvme_events if e["what"] == "abort")
    assert (abort["qid"], abort["aborted"]) == (1, False)
    assert whats.index("abort") < whats.index("reset") < whats.index("enabled")
    assert run.steps["write"]["seconds"] >= 2 * IO_TIMEOUT
    assert commands(run.device, IoOpcode.WRITE) >= 2  # the hung write, then the driver's retry


async def test_an_aborted_write_is_retried_without_a_reset(
    qemu_binary: Path, guest_artefacts: GuestArtefacts, vdev_socket_dir: Path
) -> None:
    """The write hangs until the driver's Abort completes it (Command Abort Requested): the driver retries it."""
    plan = DeviceFaultPlan(
        [DeviceFault(on="nvme-command", action="hang", where={**NAMESPACE_1, "opcode": IoOpcode.WRITE}, count=1)]
    )
    steps = "step write write /tmp/data2 4096 4096\nstep verify verify /tmp/data2 4096\n"
    run = await run_scenario(qemu_binary, guest_artefacts, vdev_socket_dir, steps, plan, scenario="hang-abortable")

    assert run.steps["write"]["status"] == 0 and run.steps["verify"]["status"] == 0, run.summary()
    assert run.logged(r"I/O (tag )?\d+ .*QID 1 timeout, aborting"), run.summary()
    assert not run.logged(r"reset controller"), run.summary()
    assert [e["aborted"] for e in run.nvme_events if e["what"] == "abort"] == [True]
    whats = [e["what"] for e in run.nvme_events]
    assert "reset" not in whats[: whats.index("shutdown")]  # until the guest powers off
    assert commands(run.device, IoOpcode.WRITE) == 2


async def test_a_read_error_fails_the_read_with_dnr_and_is_retried_without(
    qemu_binary: Path, guest_artefacts: GuestArtefacts, vdev_socket_dir: Path
) -> None:
    """Unrecovered Read Error on two reads: with DNR the read fails (EIO); without, the driver retries it."""
    read = {**NAMESPACE_1, "opcode": IoOpcode.READ}
    plan = DeviceFaultPlan(
        [
            DeviceFault(on="nvme-command", action="status", where=read, count=1,
                  params={"status": "UNRECOVERED_READ_ERROR", "dnr": True}),
            DeviceFault(on="nvme-command", action="status", where=read, count=1,
                  params={"status": "UNRECOVERED_READ_ERROR", "dnr": False}),
        ]
    )  # fmt: skip
    steps = "step dnr read_back 4096 4096\nstep retried read_back 4096 4096\nstep verify verify /tmp/data 4096\n"
    run = await run_scenario(qemu_binary, guest_artefacts, vdev_socket_dir, steps, plan, scenario="read-error")

    assert run.steps["dnr"]["status"] != 0, run.summary()
    assert run.steps["retried"]["status"] == 0 and run.steps["verify"]["status"] == 0, run.summary()
    # Debian builds without NVME_VERBOSE_ERRORS: the opcode and status are numbers, not names
    assert run.logged(rf"{run.ns1}: .*\(0x2\) @ LBA 0, 8 blocks, .*\(sct 0x2 / sc 0x81\) DNR"), run.summary()
    # 6.1 and 6.12 name the block status of Unrecovered Read Error: BLK_STS_MEDIUM
    assert run.logged(rf"(critical medium error|I/O error), dev {run.ns1}, sector 0 op 0x0:\(READ\)"), run.summary()
    # one line for the failed read, none for the transparently retried one
    assert len(run.logged(r"sc 0x81")) == 1, run.summary()
    errors = [e for e in run.nvme_events if e["what"] == "error"]
    assert [(e["status"], e["dnr"]) for e in errors] == [(0x281, True), (0x281, False)]


async def test_controller_fatal_status_during_io_makes_the_driver_reset(
    qemu_binary: Path, guest_artefacts: GuestArtefacts, vdev_socket_dir: Path
) -> None:
    """CSTS.CFS in the middle of a 4 MiB write: the driver's timeout sees it, resets, and the write completes."""
    plan = DeviceFaultPlan(
        [
            DeviceFault(
                on="nvme-command", action="fatal", where={**NAMESPACE_1, "opcode": IoOpcode.WRITE}, after=16, count=1
            )
        ]
    )
    steps = "step write write /tmp/data2 4194304 65536\nstep verify verify /tmp/data2 4194304\n"
    run = await run_scenario(qemu_binary, guest_artefacts, vdev_socket_dir, steps, plan, scenario="cfs")

    assert run.steps["write"]["status"] == 0 and run.steps["verify"]["status"] == 0, run.summary()
    assert run.logged(r"controller is down; will reset: CSTS=0x3"), run.summary()
    whats = [e["what"] for e in run.nvme_events]
    assert whats.index("fatal") < whats.index("reset") < whats.index("enabled")


async def test_memory_decoding_cleared_by_the_device_under_io_makes_the_driver_reset(
    qemu_binary: Path, guest_artefacts: GuestArtefacts, vdev_socket_dir: Path
) -> None:
    """The device clears its own MEM bit during a write: BAR reads return all-ones; the driver resets, re-enables it."""
    plan = DeviceFaultPlan(
        [DeviceFault(on="nvme-command", action="memory-off", where={**NAMESPACE_1, "opcode": IoOpcode.WRITE}, after=16,
               count=1)]
    )  # fmt: skip
    steps = "step write write /tmp/data2 4194304 65536\nstep verify verify /tmp/data2 4194304\n"
    run = await run_scenario(qemu_binary, guest_artefacts, vdev_socket_dir, steps, plan, scenario="memory-off")

    assert run.steps["write"]["status"] == 0 and run.steps["verify"]["status"] == 0, run.summary()
    assert run.logged(r"controller is down; will reset: CSTS=0xffffffff"), run.summary()
    transitions = [(e.source, e.memory) for e in run.device.events.of_kind(CommandChange)]
    assert transitions[0] == ("device", False)
    assert ("client", True) in transitions[1:]
    dropped = [e for e in run.device.events.of_kind(Violation) if e.what == "access while disabled"]
    assert dropped, "no BAR access arrived while memory decoding was off"
    assert [e["what"] for e in run.nvme_events].count("enabled") >= 1


async def test_a_dropped_interrupt_is_found_by_the_drivers_timeout_poll(
    qemu_binary: Path, guest_artefacts: GuestArtefacts, vdev_socket_dir: Path
) -> None:
    """The completion is posted but its MSI-X message never sent: the timeout handler polls the queue and finds it."""
    plan = DeviceFaultPlan([DeviceFault(on="irq", action="drop", vector=1, count=1)])
    steps = "step write write /tmp/data2 4096 4096\nstep verify verify /tmp/data2 4096\n"
    run = await run_scenario(qemu_binary, guest_artefacts, vdev_socket_dir, steps, plan, scenario="irq-drop")

    assert run.steps["write"]["status"] == 0 and run.steps["verify"]["status"] == 0, run.summary()
    assert run.logged(r"I/O (tag )?\d+ .*QID 1 timeout, completion polled"), run.summary()
    assert not run.logged(r"aborting|reset controller"), run.summary()
    assert run.steps["write"]["seconds"] >= IO_TIMEOUT
    assert [e.fault.action for e in run.device.events.of_kind(FaultInjected)] == ["drop"]


async def test_a_namespace_resize_is_announced_by_an_async_event_and_rescanned(
    qemu_binary: Path, guest_artefacts: GuestArtefacts, vdev_socket_dir: Path
) -> None:
    """Namespace 1 grows from 64 to 96 MiB: a Namespace Attribute Changed event, and the driver rescans."""
    steps = r"""
while [ "$(cat "/sys/block/${ns1##*/}/size")" = "$sectors" ]; do usleep 50000; done
report nvme.resized "\"sectors\":$(cat "/sys/block/${ns1##*/}/size")"
step verify verify /tmp/data 4194304
"""

    def grow(device: Nvme) -> None:
        device.resize_namespace(1, 96 * MiB)

    run = await run_scenario(
        qemu_binary, guest_artefacts, vdev_socket_dir, steps, act=grow, go=False, scenario="namespace-resize"
    )

    assert run.steps["verify"]["status"] == 0, run.summary()
    assert run.logged(rf"{run.ns1}: detected capacity change from 131072 to 196608"), run.summary()
    assert run.logged(r"rescanning namespaces"), run.summary()
    event = next(e for e in run.nvme_events if e["what"] == "async event")
    assert (event["type"], event["info"], event["log"]) == (2, 0, 4)
    admin = [(e["opcode"], e["cdw10"] & 0xFF) for e in run.nvme_events if e["what"] == "admin"]
    assert (0x02, 0x04) in admin  # the driver read the Changed Namespace List
