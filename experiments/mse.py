"""The concurrent-fault experiment on vfio-pci's memory-enable (COMMAND.MEM) handling.

When software clears MEM, Linux's vfio-pci zaps user mappings of the BARs;
faults raise SIGBUS and ``pread``/``pwrite`` fail with EIO until MEM is set
again, and pages come back on fault.  That fault path was reworked in 2021
(concurrent faults), 6.10 (zap by address space, whole-mapping prefault)
and 6.12 (huge-page faults), each time with fallout (docs/experiment.md).
This experiment runs one workload against several guest kernels:

1. a guest boots with vdev's ``membar`` device attached over vfio-user;
2. ``mse-fault`` (``guest/mse-fault.c``) binds it to vfio-pci, maps BAR0 and
   stamps its pages from N threads while MEM is toggled — by a guest thread
   through vfio's config region (``guest`` mode) or by the device itself
   (``server`` mode), or by both at once (``combined``); in guest mode also
   a ``VFIO_DEVICE_RESET`` under faults, D3hot through PMCSR under faults,
   a hot reset where the topology allows one, quiet first-touch timings and
   fault counts, a fork case, the storm, and last, closing the device while
   MEM is off and BAR0 is mapped;
3. the guest's report, the server's ordered event log and BAR0's contents
   after the run become :class:`Verdict` s.

Matching the two sides: before every flip the guest writes the number of
the epoch the flip starts to membar's BAR2 doorbell (register 0x00), so in
the server's log every COMMAND change sits under the label of the guest
epoch it belongs to (:class:`ServerLog`).  In guest mode a disabled epoch
must hold exactly one MEM-off and one MEM-on change, an enabled epoch none.

Verdicts, guest mode: SIGBUS only in epochs the server saw disabled (and
some there: the path was exercised), no store succeeding while MEM was off,
every stamp intact in BAR0 as the server holds it, EIO from ``pread`` and
``pwrite`` while disabled, the reset stalls faulting threads instead of
SIGBUS, both fork children fault once the parent cleared MEM, a clean
kernel log, and a console log showing vfio-pci bound to membar; D3hot
blocks every access until D0 (``d3hot_blocks_access``), a hot reset behaves
like a reset or is refused for the reason read in the kernel's source
(``hot_reset``), and closing the device fd, group and container with MEM
off and BAR0 mapped returns at every step and the device opens again
(``close_while_disabled``).  Server mode: the guest saw every device-side
flip, got no SIGBUS (its kernel is never told), its doorbell writes while
disabled were master-aborted, and its stamps are intact.  Combined mode:
both sides flipped MEM, no trapped read succeeded while either had it off,
and the guest's counts of answered and master-aborted reads equal the
server log's (``combined_toggles``).

Usage::

    make experiment KERNELS="bookworm trixie" REPEAT=3
    python -m vdev_experiments.mse --kernels "bookworm trixie" --repeat 3 --out results

writes ``results/experiment.json`` (every run, with the kernel package and
version, QEMU, libvfio-user and vdev commit it ran with),
``results/experiment.md`` (per kernel and mode, how many of the repeats
passed each verdict) and ``results/experiment.png``, and keeps every console
log (and the server's log) under ``results/experiment/``.  After the main
runs, each kernel also boots once per cell of the fault matrix
(:data:`FAULT_MATRIX`: quiet enables only, BAR0 of 4 KiB to 1 GiB mapped
aligned and misaligned, and 6.1's prefault-at-enable variant), and the
report gains one table of faults per enable and first-touch latency
(``--no-fault-matrix`` skips it).  A kernel problem
on the console ends that run at once, with the kernel's report in the
output and the JSON.  The exit status is 1 only when a run could not
finish; a failed verdict is printed and counted, and is called a finding
only when it fails in every repeat.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import trio

from vdev.guest import GuestSetupError, describe, find_kernel, patched
from vdev.model.events import (
    AccessWhileDisabled,
    CommandChange,
    DeviceEvent,
    PowerChange,
    RegionRead,
    RegionWrite,
    Reset,
)
from vdev.provenance import Provenance, collect
from vdev.qemu.cmdline import MiB
from vdev.qemu.guest import GuestArtefacts, GuestError, GuestKernelError, GuestMachine, GuestResult, parse_result
from vdev.testing import served, vfio_user_pci
from vdev_devices.membar import MemBar

#: Where membar sits in the guest, per topology: ``root-bus`` puts it at ``addr=0x3`` on the q35 root bus (no
#: bridge above it, so no bus reset); ``root-port`` puts it in slot 0 behind a PCIe root port at ``addr=0x3``,
#: whose secondary bus (1) a hot reset can reset.
TOPOLOGIES = ("root-bus", "root-port")
MEMBAR_ADDRS = {"root-bus": "0000:00:03.0", "root-port": "0000:01:00.0"}
ROOT_PORT_ID = "membar-port"
#: The root port's link speed.  Above 5 GT/s the kernel waits, after a secondary bus reset, for the port to
#: report its data link layer active, which QEMU's port never does again: the reset then fails with ENOTTY
#: ("Data Link Layer Link Active not set" on the console).  At 5 GT/s it waits a fixed delay and polls the
#: device instead (drivers/pci/pci.c, pci_bridge_wait_for_secondary_bus).
ROOT_PORT_SPEED = "5"
MEMBAR_IDS = ("1b36", "0f01")
PAGE = 4096
#: The label of server events before the guest's first doorbell.
BEFORE = -1
DEFAULT_KERNELS = ("bookworm", "trixie")
MODES = ("guest", "server", "combined")
#: membar's BAR2 register the combined mode's reader reads (the low half of ``bar0_size``).
TRAPPED_READ_OFFSET = 0x28

_STAMP_MAGIC = 0x5A
_FNV_OFFSET = 0xCBF29CE484222325
_FNV_PRIME = 0x100000001B3
_U64 = (1 << 64) - 1


#: Verdicts a kernel package fails for a reason read in its source and repeated in recorded runs:
#: (package, version) -> verdict -> where the evidence is.  Only an exact package version counts, never a
#: range: a version not listed must pass every verdict, and a failure there is news to investigate.
KNOWN_FAILURES: Mapping[tuple[str, str], Mapping[str, str]] = {
    ("linux-image-6.1.0-56-amd64", "6.1.192-2"): {
        "fork_mapped_child": "docs/findings.md, section 5 (Debian 6.1.192-2: a forked child keeps live BAR mappings)",
    },
}


def known_failures(provenance: Provenance) -> Mapping[str, str]:
    """The verdicts :data:`KNOWN_FAILURES` records for the kernel package that ran, with their evidence."""
    key = (provenance.kernel_package or "", provenance.kernel_package_version or "")
    return KNOWN_FAILURES.get(key, {})


# -- configuration ---------------------------------------------------------------------


@dataclass(frozen=True)
class MseConfig:
    """One run's parameters: the guest program's arguments and the device's policies."""

    #: ``guest``: a guest thread flips MEM; ``server``: the device does; ``combined``: both at once.
    mode: str = "guest"
    threads: int = 4
    #: Guest mode: MEM off/on cycles while the workers fault, ``period_ms`` per epoch.
    cycles: int = 8
    period_ms: int = 20
    #: Guest mode: quiet off/on cycles timing the first touch and a walk of BAR0.
    latency_cycles: int = 6
    reset: bool = True
    fork: bool = True
    #: Guest mode, under load after the toggles: D3hot and back through PMCSR, and a hot reset where allowed.
    d3hot: bool = True
    hot_reset: bool = True
    #: Guest mode, last: close the device fd, group and container while MEM is off and BAR0 is mapped.
    close: bool = True
    #: Guest mode: enables under load at the end, every toucher released together after each
    #: (``threads`` threads in the program and in each of ``storm_processes`` children).
    storm_cycles: int = 1000
    storm_processes: int = 2
    #: Map BAR0 one page off its natural alignment, which rules out huge-page
    #: faults (6.12+), to compare first-touch costs with and without them.
    misaligned: bool = False
    #: Server mode: the guest watches COMMAND this long; the server flips MEM
    #: ``toggles`` times (even, so that it ends enabled), every ``toggle_period`` s.
    seconds: int = 3
    toggles: int = 6
    toggle_period: float = 0.25
    #: membar's BAR0 size.
    size: str = "4M"
    #: membar's ``mapping`` policy; empty: ``revoke`` in guest mode, ``keep`` in
    #: server mode (see :attr:`membar_mapping`).
    mapping: str = ""
    smp: int = 2
    memory_mib: int = 256
    #: Where membar sits in the guest (:data:`TOPOLOGIES`).
    topology: str = "root-port"
    #: The whole run's bound; a kernel problem ends it at once, so this only catches a silent hang.
    timeout: float = 300.0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {self.mode!r}")
        if self.topology not in TOPOLOGIES:
            raise ValueError(f"topology must be one of {TOPOLOGIES}, not {self.topology!r}")
        if self.mode in ("server", "combined") and self.membar_mapping != "keep":
            raise ValueError(
                "server mode needs mapping=keep: QEMU keeps BAR0 in the guest's address space when the device "
                "clears MEM itself, so a revoked memfd would kill QEMU with SIGBUS on the guest's next store"
            )
        if self.mode in ("server", "combined") and self.toggles * self.toggle_period >= self.seconds:
            raise ValueError("the server's toggles must end before the guest stops watching")

    @property
    def membar_mapping(self) -> str:
        """The ``mapping`` policy membar is served with.

        Guest mode revokes (the server's memfd is truncated while MEM is off,
        like vfio-pci's zap, which also exercises save and restore); QEMU
        removes the BAR before anything could touch it.
        """
        return self.mapping or ("revoke" if self.mode == "guest" else "keep")

    @property
    def membar_addr(self) -> str:
        """membar's PCI address in the guest, which the topology decides."""
        return MEMBAR_ADDRS[self.topology]

    def qemu_devices(self, socket: Path) -> list[dict[str, object]]:
        """The ``-device`` specs that put membar, served on ``socket``, where :attr:`topology` says."""
        if self.topology == "root-bus":
            return [vfio_user_pci(socket, addr="0x3")]
        port = {
            "driver": "pcie-root-port",
            "id": ROOT_PORT_ID,
            "bus": "pcie.0",
            "addr": "0x3",
            "chassis": 1,
            "x-speed": ROOT_PORT_SPEED,
        }
        return [port, vfio_user_pci(socket, bus=ROOT_PORT_ID, addr="0x0")]

    def guest_command(self) -> str:
        """The ``mse-fault`` command line."""
        words = ["mse-fault", "-m", self.mode, "-t", str(self.threads)] + (["-u"] if self.misaligned else [])
        if self.mode == "guest":
            words += ["-c", str(self.cycles), "-p", str(self.period_ms), "-l", str(self.latency_cycles)]
            words += ["-s", str(self.storm_cycles), "-P", str(self.storm_processes)]
            words += [] if self.reset else ["-R"]
            words += [] if self.fork else ["-F"]
            words += [] if self.d3hot else ["-D"]
            words += [] if self.hot_reset else ["-H"]
            words += [] if self.close else ["-C"]
        elif self.mode == "combined":
            words += ["-d", str(self.seconds), "-p", str(self.period_ms)]
        else:
            words += ["-d", str(self.seconds)]
        return " ".join(words)


# -- the guest's side -------------------------------------------------------------------


@dataclass
class GuestReport:
    """What ``mse-fault`` reported, by kind (see the top of guest/mse-fault.c)."""

    device: Mapping[str, Any] | None = None
    epochs: list[Mapping[str, Any]] = field(default_factory=list)
    latency: list[Mapping[str, Any]] = field(default_factory=list)
    eio: Mapping[str, Any] | None = None
    reset: Mapping[str, Any] | None = None
    storm: Mapping[str, Any] | None = None
    d3hot: Mapping[str, Any] | None = None
    hot_reset: Mapping[str, Any] | None = None
    close: Mapping[str, Any] | None = None
    combined: Mapping[str, Any] | None = None
    close_steps: list[Mapping[str, Any]] = field(default_factory=list)
    forks: list[Mapping[str, Any]] = field(default_factory=list)
    stamps: list[Mapping[str, Any]] = field(default_factory=list)
    readback: Mapping[str, Any] | None = None
    done: Mapping[str, Any] | None = None
    errors: list[Mapping[str, Any]] = field(default_factory=list)

    @classmethod
    def from_results(cls, results: Iterable[Mapping[str, Any]]) -> GuestReport:
        report = cls()
        single = {"mse.device": "device", "mse.eio": "eio", "mse.reset": "reset", "mse.readback": "readback"}
        single |= {"mse.storm": "storm", "mse.d3hot": "d3hot", "mse.hot_reset": "hot_reset", "mse.close": "close"}
        single |= {"mse.combined": "combined"}
        lists = {"mse.epoch": report.epochs, "mse.latency": report.latency, "mse.fork": report.forks}
        lists |= {"mse.stamps": report.stamps, "mse.error": report.errors, "mse.close.step": report.close_steps}
        for result in results:
            kind = result["kind"]
            if kind in single:
                setattr(report, single[kind], result)
            elif kind in lists:
                lists[kind].append(result)
            elif kind == "mse.done":
                report.done = result
        return report

    @property
    def last_epoch(self) -> int:
        return max((epoch["epoch"] for epoch in self.epochs), default=-1)

    def epoch(self, number: int) -> Mapping[str, Any]:
        return next(epoch for epoch in self.epochs if epoch["epoch"] == number)

    def enable_ns(self, phase: str) -> list[int]:
        """How long each enabling COMMAND write of ``phase`` took: what a kernel that maps BAR0 at the enable pays."""
        return [e["flip_ns"] for e in self.epochs if e["phase"] == phase and e["state"] == "enabled"]


# -- the server's side ------------------------------------------------------------------


@dataclass(frozen=True)
class Transition:
    """One change of COMMAND.MEM in the server's log."""

    memory: bool
    source: str


@dataclass
class ServerLog:
    """The server's event log cut into the guest's epochs by the doorbell writes.

    Every event after a doorbell write of value *n* (BAR2 offset 0) belongs
    to label *n*; events before the first one to :data:`BEFORE`.
    """

    doorbells: list[int] = field(default_factory=list)
    transitions: dict[int, list[Transition]] = field(default_factory=dict)
    resets: dict[int, list[str]] = field(default_factory=dict)
    #: Label -> master-aborted (or refused) doorbell writes under it.
    violations: dict[int, int] = field(default_factory=dict)
    #: Label -> the power states (PMCSR) the device moved to under it, in order.
    power: dict[int, list[int]] = field(default_factory=dict)
    #: Reads of BAR2 :data:`TRAPPED_READ_OFFSET` (combined mode): answered with the register's value,
    #: master-aborted, and answered with anything but all-ones while the device had MEM off (never, if the
    #: device model is right).
    trapped_reads_answered: int = 0
    trapped_reads_aborted: int = 0
    trapped_reads_answered_while_off: int = 0

    @classmethod
    def from_events(cls, events: Iterable[DeviceEvent]) -> ServerLog:
        log = cls()
        label = BEFORE
        memory = False
        for event in events:
            match event:
                case CommandChange(new=new):
                    memory = bool(new & 0x2)
            match event:
                case AccessWhileDisabled(region=2, offset=offset, access="read") if offset == TRAPPED_READ_OFFSET:
                    log.trapped_reads_aborted += 1
                case RegionRead(region=2, offset=offset, size=size, value=int(value)) if (
                    offset == TRAPPED_READ_OFFSET and value != (1 << (8 * size)) - 1
                ):
                    log.trapped_reads_answered += 1
                    log.trapped_reads_answered_while_off += not memory
                case RegionWrite(region=2, offset=0, value=int(value)):
                    # Written as 8 bytes; vfio-pci may split that into two 4-byte writes, offset 0 first.
                    label = value & 0xFFFF_FFFF
                    log.doorbells.append(label)
                case AccessWhileDisabled(region=2, offset=0):
                    log.violations[label] = log.violations.get(label, 0) + 1
                case CommandChange(old=old, new=new, memory=memory_now, source=source) if (old ^ new) & 0x2:
                    log.transitions.setdefault(label, []).append(Transition(memory_now, source))
                case Reset(reason=reason):
                    log.resets.setdefault(label, []).append(reason)
                case PowerChange(new=state):
                    log.power.setdefault(label, []).append(state)
        return log

    def memory_changes(self, label: int) -> list[bool]:
        return [t.memory for t in self.transitions.get(label, [])]

    def decoding_stopped(self, label: int) -> bool:
        """Whether the device stopped decoding memory under ``label``: MEM cleared or a move out of D0."""
        return False in self.memory_changes(label) or any(state != 0 for state in self.power.get(label, []))

    def to_json(self) -> dict[str, Any]:
        return {
            "doorbells": len(self.doorbells),
            "transitions": {str(k): [asdict(t) for t in v] for k, v in sorted(self.transitions.items())},
            "resets": {str(k): v for k, v in sorted(self.resets.items())},
            "violations": {str(k): v for k, v in sorted(self.violations.items())},
            "power": {str(k): v for k, v in sorted(self.power.items())},
            "trapped_reads": {
                "answered": self.trapped_reads_answered,
                "aborted": self.trapped_reads_aborted,
                "answered_while_off": self.trapped_reads_answered_while_off,
            },
        }


# -- verdicts ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """One check of a run: its name, whether it held, and the numbers behind it."""

    name: str
    passed: bool
    detail: str


def fnv1a(words: Iterable[int]) -> int:
    """FNV-1a 64 over 8-byte little-endian words: the hash ``mse-fault`` reports per thread."""
    value = _FNV_OFFSET
    for word in words:
        for byte in word.to_bytes(8, "little"):
            value = ((value ^ byte) * _FNV_PRIME) & _U64
    return value


def check_stamps(memory: bytes, stamps: Sequence[Mapping[str, Any]], last_epoch: int) -> Verdict:
    """Every thread's last stamp of every page is in BAR0 as the server holds it, and well formed."""
    pages = len(memory) // PAGE
    problems: list[str] = []
    stamped = 0
    for report in stamps:
        thread = report["thread"]
        words = [
            int.from_bytes(memory[p * PAGE + 8 * thread : p * PAGE + 8 * thread + 8], "little") for p in range(pages)
        ]
        stamped += sum(1 for word in words if word)
        if fnv1a(words) != report["hash"] or sum(1 for word in words if word) != report["stamped"]:
            problems.append(f"thread {thread}: BAR0 differs from what the guest stored")
        for page, word in enumerate(words):
            if word and (
                word >> 56 != _STAMP_MAGIC
                or word >> 44 & 0xFFF != thread
                or word & 0xFFFFF != page
                or word >> 20 & 0xFFFFFF > last_epoch
            ):
                problems.append(f"thread {thread} page {page}: malformed stamp {word:#x}")
                break
    if not stamps:
        problems.append("the guest reported no stamps")
    detail = (
        "; ".join(problems) if problems else f"{stamped} stamps from {len(stamps)} threads match the guest's hashes"
    )
    return Verdict("stamps_intact", not problems, detail)


def _completed(report: GuestReport) -> Verdict:
    done = report.done
    if done is None:
        return Verdict("completed", False, "mse-fault never reported mse.done")
    ok = not report.errors and "setup" not in done.get("failed", [])
    errors = ", ".join(f"{e['op']}: {e['message']}" for e in report.errors)
    return Verdict(
        "completed", ok, f"status {done['status']}, failed {done.get('failed')}" + (f"; {errors}" if errors else "")
    )


def _console_shows_vfio_pci(console: str, addr: str) -> Verdict:
    for line in console.splitlines():
        try:
            data = parse_result(line)
        except ValueError:
            continue
        if (
            data is not None
            and data["kind"] == "pci.device"
            and data.get("addr") == addr
            and (data.get("vendor"), data.get("device")) == MEMBAR_IDS
            and data.get("driver") == "vfio-pci"
        ):
            return Verdict("vfio_pci_bound", True, f"console: {addr} {':'.join(MEMBAR_IDS)} driver vfio-pci")
    return Verdict("vfio_pci_bound", False, f"no pci.device line shows {addr} bound to vfio-pci")


def _epochs_match_server(report: GuestReport, server: ServerLog) -> Verdict:
    mismatches: list[str] = []
    doorbells = set(server.doorbells)
    for epoch in report.epochs:
        number, state = epoch["epoch"], epoch["state"]
        changes = server.memory_changes(number)
        if number not in doorbells:
            mismatches.append(f"epoch {number}: no doorbell in the server's log")
        if state == "disabled" and changes != [False, True]:
            mismatches.append(f"epoch {number} (disabled): server saw MEM changes {changes}")
        elif state == "enabled" and changes:
            mismatches.append(f"epoch {number} (enabled): server saw MEM changes {changes}")
        elif state == "d3hot" and (changes or server.power.get(number) != [3, 0]):
            mismatches.append(
                f"epoch {number} (d3hot): server saw power states {server.power.get(number)}, MEM changes {changes}"
            )
        elif state == "reset" and not server.resets.get(number):
            mismatches.append(f"epoch {number} (reset): server saw no reset")
        elif state == "storm":
            cycles = report.storm["cycles"] if report.storm else 0
            if changes != [False, True] * cycles:
                off, on = changes.count(False), changes.count(True)
                mismatches.append(f"epoch {number} (storm of {cycles} cycles): server saw {off} off and {on} on")
    detail = "; ".join(mismatches[:5]) or f"{len(report.epochs)} epochs agree with {len(server.doorbells)} doorbells"
    return Verdict("epochs_match_server", not mismatches, detail)


def _sigbus_only_when_disabled(report: GuestReport, server: ServerLog) -> Verdict:
    unexplained = sum(epoch["sigbus_unexplained"] for epoch in report.epochs)
    wrong = [
        f"epoch {epoch['epoch']}: {epoch['sigbus']}"
        for epoch in report.epochs
        if epoch["sigbus"] and not server.decoding_stopped(epoch["epoch"])
    ]
    total = sum(epoch["sigbus"] for epoch in report.epochs)
    ok = not unexplained and not wrong
    detail = f"{total} SIGBUS, {unexplained} with MEM on all along"
    return Verdict(
        "sigbus_only_when_disabled", ok, detail + (f"; in epochs the server saw enabled: {wrong}" if wrong else "")
    )


def _faults_exercised(report: GuestReport) -> Verdict:
    counts = [e["sigbus"] for e in report.epochs if e["state"] == "disabled" and e["phase"] == "toggle"]
    return Verdict(
        "faults_exercised",
        sum(counts) > 0,
        f"SIGBUS in the {len(counts)} disabled epochs under load: {counts}",
    )


def _storm(storm: Mapping[str, Any]) -> Verdict:
    """Every storm cycle ran, no toucher took a SIGBUS with MEM on, and the child processes were well."""
    ok = storm["cycles"] == storm["requested"] and storm["sigbus"] == 0 and storm["children_ok"]
    detail = (
        f"{storm['cycles']}/{storm['requested']} enables with {storm['touchers']} touchers "
        f"({storm['threads']} threads x {storm['processes'] + 1} processes), {storm['touches']} touches, "
        f"{storm['sigbus']} SIGBUS, {storm['faults']} faults ({storm['faults_per_cycle_min']}-"
        f"{storm['faults_per_cycle_max']} per enable), {storm['remaps']} remaps, {storm['splits']} vma splits"
    )
    return Verdict("storm_no_sigbus_while_enabled", ok, detail)


def _no_store_while_disabled(report: GuestReport) -> Verdict:
    stored = {e["epoch"]: e["stored_while_disabled"] for e in report.epochs if e["stored_while_disabled"]}
    return Verdict("no_store_while_disabled", not stored, f"stores that succeeded with MEM off: {stored or 'none'}")


def _eio_while_disabled(report: GuestReport) -> Verdict:
    eio = report.eio
    if eio is None:
        return Verdict("eio_while_disabled", False, "no mse.eio report")
    preads, pwrites = eio["bar0_pread_disabled"], eio["bar2_pwrite_disabled"]
    ok = (
        eio["bar0_pread_enabled"] == "ok"
        and preads["EIO"] > 0
        and preads["ok"] == preads["other"] == 0
        and pwrites["EIO"] > 0
        and pwrites["ok"] == pwrites["other"] == 0
    )
    return Verdict(
        "eio_while_disabled",
        ok,
        f"BAR0 pread while disabled {preads}, BAR2 pwrite while disabled {pwrites}, pread enabled "
        f"{eio['bar0_pread_enabled']}",
    )


def _reset_stalls(report: GuestReport, server: ServerLog) -> Verdict:
    reset = report.reset
    if reset is None:
        return Verdict("reset_stalls_without_sigbus", False, "no mse.reset report")
    reasons = server.resets.get(reset["epoch"], [])
    ok = reset["result"] == "ok" and reset["sigbus"] == 0 and bool(reasons)
    return Verdict(
        "reset_stalls_without_sigbus",
        ok,
        f"VFIO_DEVICE_RESET {reset['result']} in {reset['ns'] / 1e6:.0f} ms, "
        f"longest store {reset['max_stall_ns'] / 1e6:.0f} ms, {reset['sigbus']} SIGBUS; server resets {reasons}",
    )


def _d3hot_blocks_access(report: GuestReport, server: ServerLog) -> Verdict:
    """D3hot through PMCSR: both transitions took, nothing reached BAR0 in D3hot, and D0 gave it back."""
    d3hot = report.d3hot
    if d3hot is None:
        return Verdict("d3hot_blocks_access", False, "no mse.d3hot report")
    number = d3hot["epoch"]
    epoch = report.epoch(number)
    after = [e for e in report.epochs if e["epoch"] == number + 1]
    problems = []
    if (d3hot["to_d3"], d3hot["state_d3"], d3hot["to_d0"], d3hot["state_d0"]) != ("ok", 3, "ok", 0):
        problems.append(
            f"PMCSR writes {d3hot['to_d3']}/{d3hot['to_d0']}, read back D{d3hot['state_d3']} then D{d3hot['state_d0']}"
        )
    if epoch["stored_while_disabled"] or epoch["sigbus_unexplained"]:
        problems.append(f"{epoch['stored_while_disabled']} stores succeeded in D3hot")
    if d3hot["pread_d3"] != "EIO" or d3hot["doorbell_d3"] != "EIO":
        problems.append(f"in D3hot a BAR0 pread gave {d3hot['pread_d3']}, the doorbell {d3hot['doorbell_d3']}")
    if d3hot["doorbell_d0"] != "ok" or not after or not after[0]["stamps"] or after[0]["sigbus"]:
        problems.append("back in D0 the workers did not store without SIGBUS, or the doorbell failed")
    if server.power.get(number) != [3, 0]:
        problems.append(f"the server saw power states {server.power.get(number)} in the epoch")
    detail = (
        f"D3hot for {epoch['ns'] / 1e6:.0f} ms under load: {epoch['sigbus']} SIGBUS, "
        f"{epoch['stored_while_disabled']} stores succeeded, pread {d3hot['pread_d3']}; back in D0 "
        f"{after[0]['stamps'] if after else 0} stores; server power states {server.power.get(number)}"
    )
    return Verdict("d3hot_blocks_access", not problems, "; ".join(problems) or detail)


#: Why a hot reset cannot run for membar on the q35 root bus (topology ``root-bus``), read in the kernel's source:
#: no bridge above it whose secondary bus could be reset, and no hotplug slot.  Behind a root port it must run.
HOT_RESET_REFUSED = (
    "ENODEV",
    "VFIO_DEVICE_GET_PCI_HOT_RESET_INFO returns -ENODEV when pci_probe_reset_slot() fails (no hotplug slot) "
    "and pci_probe_reset_bus() fails (a root bus has no bus->self bridge: -ENOTTY); read in Debian's "
    "linux-source-6.1 6.1.176-1, drivers/vfio/pci/vfio_pci_core.c and drivers/pci/pci.c",
)


def _hot_reset(report: GuestReport, server: ServerLog, topology: str) -> Verdict:
    """A hot reset that ran behaves like a device reset; one that cannot run is refused for the known reason only.

    Like ``VFIO_DEVICE_RESET``, the bus reset holds the memory lock for
    writing across the reset, so the workers faulting on BAR0 wait rather
    than take a SIGBUS; the kernel clears COMMAND (MEM with it) before the
    reset and writes the saved COMMAND back after it, which the server
    sees as MEM off then on, and the guest reads MEM set afterwards.
    """
    hot = report.hot_reset
    if hot is None:
        return Verdict("hot_reset", False, "no mse.hot_reset report")
    if hot["info"] != "ok":
        expected, why = HOT_RESET_REFUSED
        ok = hot["info"] == expected and topology == "root-bus"
        reason = why if ok else f"an unexpected refusal with membar on the {topology} (on the root bus: {why})"
        return Verdict("hot_reset", ok, f"not possible here: {hot['info']} (errno {hot['info_errno']}); {reason}")
    epoch = report.epoch(hot["epoch"]) if hot["result"] != "not tried" else {"sigbus": 0}
    reasons = server.resets.get(hot["epoch"], [])
    memory = server.memory_changes(hot["epoch"])
    command = hot.get("command", -1)
    problems = []
    if hot["result"] != "ok":
        problems.append(f"the reset answered {hot['result']} after {hot.get('attempts', 1)} attempts")
    if epoch["sigbus"]:
        problems.append(f"{epoch['sigbus']} SIGBUS while the reset held the memory lock")
    if not reasons:
        problems.append("the server saw no reset")
    if memory[:1] != [False] or memory[-1:] != [True]:
        problems.append(f"the server saw MEM {memory} in the reset epoch, not cleared then restored")
    if command < 0 or not command & 0x2:
        problems.append(f"COMMAND read back after the reset is {command:#x}, MEM not restored")
    detail = (
        f"VFIO_DEVICE_PCI_HOT_RESET {hot['result']} ({hot['devices']} devices affected, {hot.get('attempts', 1)} "
        f"attempts) in {hot['ns'] / 1e6:.0f} ms, {epoch['sigbus']} SIGBUS; server resets {reasons}, MEM {memory}; "
        f"COMMAND after {command:#x}"
    )
    return Verdict("hot_reset", not problems, "; ".join(problems + [detail]) if problems else detail)


#: What each step of the close phase must give (see close_phase in guest/mse-fault.c).
CLOSE_EXPECTED = {
    "mem_off": "ok",
    "touch_disabled": "sigbus",
    "close_device": "ok",
    "close_group": "ok",
    "close_container": "ok",
    "touch_closed": "sigbus",
    "munmap": "ok",
    "child_exit": "ok",
    "reopen": "ok",
    "map": "ok",
    "stamp_reopened": "match",
}


def _close_while_disabled(report: GuestReport) -> Verdict:
    """Closing the device with MEM off and BAR0 mapped: every step returned as expected and a re-open works."""
    steps = {step["step"]: step["result"] for step in report.close_steps}
    missing = [name for name in CLOSE_EXPECTED if name not in steps]
    if missing:
        last = report.close_steps[-1]["step"] if report.close_steps else "none"
        return Verdict(
            "close_while_disabled", False, f"steps never reported: {', '.join(missing)} (last reported: {last})"
        )
    wrong = {name: steps[name] for name, want in CLOSE_EXPECTED.items() if steps[name] != want}
    detail = ", ".join(f"{name} {result}" for name, result in steps.items())
    return Verdict("close_while_disabled", not wrong and report.close is not None, detail)


def _fork_child(child: Mapping[str, Any]) -> Verdict:
    expected = {
        "inherited_before": "ok",
        "fresh_before": "ok",
        "inherited_disabled": "sigbus",
        "fresh_disabled": "sigbus",
        "pread_disabled": "EIO",
        "inherited_after": "ok",
        "fresh_after": "ok",
    }
    wrong = {key: child[key] for key, want in expected.items() if child[key] != want}
    detail = f"forked with the parent's BAR0 entries {child['forked']}: " + (
        ", ".join(f"{k} {v}" for k, v in wrong.items()) if wrong else "both mappings fault while MEM is off"
    )
    if child["inherited_disabled"] == "ok":
        detail += f" (read {child['inherited_value']:#x} through the inherited mapping)"
    return Verdict(f"fork_{child['forked']}_child", not wrong and child["status"] == 0, detail)


def _kernel_clean(problems: Sequence[str]) -> Verdict:
    return Verdict("kernel_clean", not problems, "; ".join(problems[:3]) or "no kernel problem on the console")


def _guest_saw_server_toggles(report: GuestReport, server: ServerLog) -> Verdict:
    seen = [epoch["state"] == "enabled" for epoch in report.epochs if epoch["epoch"] > 0]
    flipped = [
        t.memory
        for label in range(0, report.last_epoch + 1)
        for t in server.transitions.get(label, [])
        if t.source == "device"
    ]
    return Verdict(
        "guest_saw_server_toggles",
        bool(flipped) and seen == flipped,
        f"server flipped MEM to {flipped}; the guest saw {seen}",
    )


def _no_sigbus(report: GuestReport) -> Verdict:
    total = sum(epoch["sigbus"] for epoch in report.epochs)
    stored = sum(epoch["stored_while_disabled"] for epoch in report.epochs)
    return Verdict(
        "no_sigbus",
        total == 0,
        f"{total} SIGBUS; {stored} stores landed while the device had MEM off (the guest kernel is never told)",
    )


def _doorbells_master_aborted(report: GuestReport, server: ServerLog) -> Verdict:
    wrong = [
        epoch["epoch"]
        for epoch in report.epochs
        if epoch["epoch"] > 0 and bool(server.violations.get(epoch["epoch"])) != (epoch["state"] == "disabled")
    ]
    aborted = sum(server.violations.values())
    return Verdict(
        "doorbells_master_aborted",
        not wrong,
        f"{aborted} doorbell writes master-aborted" + (f"; wrong in epochs {wrong}" if wrong else ""),
    )


def _combined_toggles(report: GuestReport, server: ServerLog) -> Verdict:
    """Both sides flipped MEM; no trapped read succeeded while either had it off; the two sides' counts agree.

    A read succeeds while the guest has MEM off only if vfio-pci lets it
    through (the guest counts those); while the device has it off only if the
    device answers it (the server's log shows those).  The guest's successful
    and master-aborted reads must be exactly the ones the server answered and
    aborted: EIO reads never reach the device.
    """
    combined = report.combined
    if combined is None:
        return Verdict("combined_toggles", False, "no mse.combined report")
    flips = [t.source for transitions in server.transitions.values() for t in transitions]
    device, client = flips.count("device"), flips.count("client")
    problems = []
    if not device or not client or not combined["guest_flips"]:
        problems.append(f"MEM flips: {device} by the device, {client} by the guest")
    if combined["reads_ok_while_disabled"] or combined["reads_other"]:
        problems.append(
            f"{combined['reads_ok_while_disabled']} reads succeeded with the guest's MEM off, "
            f"{combined['reads_other']} gave something else"
        )
    if server.trapped_reads_answered_while_off:
        problems.append(f"the server answered {server.trapped_reads_answered_while_off} reads with its MEM off")
    seen = (combined["reads_ok"], combined["reads_aborted"])
    logged = (server.trapped_reads_answered, server.trapped_reads_aborted)
    if seen != logged:
        problems.append(f"guest saw {seen[0]} answered and {seen[1]} aborted reads, the server logged {logged}")
    if not combined["reads_aborted"] or not combined["reads_eio"]:
        problems.append("no read met the device's MEM off and the guest's in turn: not exercised")
    detail = (
        f"MEM flipped {device} times by the device and {client} by the guest; reads {combined['reads_ok']} ok, "
        f"{combined['reads_aborted']} master-aborted, {combined['reads_eio']} EIO; the server logged "
        f"{logged[0]} answered and {logged[1]} aborted"
    )
    return Verdict("combined_toggles", not problems, "; ".join(problems) or detail)


def _zap_paths(report: GuestReport, server: ServerLog, topology: str) -> list[Verdict]:
    """The verdicts of the zap paths besides COMMAND.MEM that ran: D3hot, hot reset, closing while disabled."""
    verdicts = []
    if report.d3hot is not None:
        verdicts.append(_d3hot_blocks_access(report, server))
    if report.hot_reset is not None:
        verdicts.append(_hot_reset(report, server, topology))
    if report.close_steps:
        verdicts.append(_close_while_disabled(report))
    return verdicts


def analyse(
    mode: str,
    results: Sequence[Mapping[str, Any]],
    server: ServerLog,
    memory: bytes,
    *,
    kernel_problems: Sequence[str] = (),
    console: str = "",
    topology: str = "root-port",
) -> list[Verdict]:
    """The verdicts of one run from the guest's results, the server's log and BAR0's final contents.

    ``topology`` is where membar sat (:data:`TOPOLOGIES`): it decides its address and whether a hot reset may be
    refused.
    """
    report = GuestReport.from_results(results)
    verdicts = [_completed(report)]
    if mode == "guest":
        verdicts += [
            _epochs_match_server(report, server),
            _sigbus_only_when_disabled(report, server),
            _faults_exercised(report),
            _no_store_while_disabled(report),
            _eio_while_disabled(report),
        ]
        if report.reset is not None:
            verdicts.append(_reset_stalls(report, server))
        verdicts += [_fork_child(child) for child in report.forks]
        if report.storm is not None:
            verdicts.append(_storm(report.storm))
        verdicts += _zap_paths(report, server, topology)
    elif mode == "combined":
        verdicts += [
            _combined_toggles(report, server),
            _no_store_while_disabled(report),
            _eio_while_disabled(report),
        ]
    else:
        verdicts += [
            _guest_saw_server_toggles(report, server),
            _no_sigbus(report),
            _doorbells_master_aborted(report, server),
        ]
    verdicts += [
        check_stamps(memory, report.stamps, report.last_epoch),
        _kernel_clean(kernel_problems),
        _console_shows_vfio_pci(console, MEMBAR_ADDRS[topology]),
    ]
    return verdicts


# -- one run ----------------------------------------------------------------------------


@dataclass
class MseRun:
    """One boot of one kernel in one mode: what was collected and what it means."""

    kernel: str
    release: str
    config: MseConfig
    results: list[Mapping[str, Any]]
    server: ServerLog
    verdicts: list[Verdict]
    console_log: Path
    boot_seconds: float | None
    seconds: float
    #: The components that ran (kernel package, QEMU, libvfio-user, vdev commit).
    provenance: Provenance
    #: Which of the kernel's repeats this was (from 1).
    repeat: int = 1
    #: The console around the first kernel problem, when the kernel reported one.
    kernel_report: list[str] = field(default_factory=list)

    @property
    def report(self) -> GuestReport:
        return GuestReport.from_results(self.results)

    @property
    def passed(self) -> bool:
        return all(verdict.passed for verdict in self.verdicts)

    def verdict(self, name: str) -> Verdict:
        return next(verdict for verdict in self.verdicts if verdict.name == name)

    def to_json(self) -> dict[str, Any]:
        report = self.report
        quiet = [entry["first_touch_ns"] for entry in report.latency]
        loaded = [
            e["first_touch_ns"] for e in report.epochs if e["phase"] == "toggle" and e["first_touch_ns"] is not None
        ]
        return {
            "kernel": self.kernel,
            "release": self.release,
            "provenance": self.provenance.to_json(),
            "repeat": self.repeat,
            "mode": self.config.mode,
            "config": asdict(self.config) | {"membar_mapping": self.config.membar_mapping},
            "command": self.config.guest_command(),
            "passed": self.passed,
            "verdicts": [asdict(verdict) for verdict in self.verdicts],
            "kernel_report": self.kernel_report,
            "boot_seconds": self.boot_seconds,
            "seconds": round(self.seconds, 2),
            "console_log": str(self.console_log),
            "device": report.device,
            "first_touch_ns": {
                "quiet": quiet,
                "quiet_median": statistics.median(quiet) if quiet else None,
                "under_load": loaded,
                "under_load_median": statistics.median(loaded) if loaded else None,
            },
            "enable_ns": {"quiet": report.enable_ns("latency"), "under_load": report.enable_ns("toggle")},
            "walk_ns": [entry["walk_ns"] for entry in report.latency],
            "walk_mapped_ns": [entry["walk_mapped_ns"] for entry in report.latency],
            "faults_per_enable": faults_per_enable(report.latency),
            "faults_first_touch": [entry.get("faults_first_touch") for entry in report.latency],
            "sigbus": {
                "total": sum(e["sigbus"] for e in report.epochs),
                "unexplained": sum(e["sigbus_unexplained"] for e in report.epochs),
                "by_epoch": [
                    {k: e[k] for k in ("epoch", "state", "phase", "sigbus", "sigbus_offsets", "stamps")}
                    for e in report.epochs
                ],
            },
            "stores": sum(s["stores"] for s in report.stamps),
            "storm": report.storm,
            "d3hot": report.d3hot,
            "hot_reset": report.hot_reset,
            "close": report.close,
            "combined": report.combined,
            "reset": report.reset,
            "fork": report.forks,
            "eio": report.eio,
            "done": report.done,
            "server": self.server.to_json(),
        }


async def run_mse(
    artefacts: GuestArtefacts,
    config: MseConfig,
    *,
    workdir: Path,
    binary: str | os.PathLike[str] | None = None,
    on_result: Callable[[GuestResult], None] | None = None,
    repeat: int = 1,
    patch: str | os.PathLike[str] | None = None,
    program: str | os.PathLike[str] | None = None,
) -> MseRun:
    """Boot ``artefacts`` with membar attached, run ``mse-fault`` as ``config`` says, and judge it.

    The console log and QEMU's stderr stay in ``workdir``.  In server mode
    the server starts flipping MEM once the guest reports ``mse.ready``.
    ``on_result`` sees every guest result as it arrives (progress output).
    A kernel problem on the console ends the run at once (the guest boots
    with warnings and oopses panicking): the run comes back with
    ``completed`` and ``kernel_clean`` failed and the kernel's report in
    :attr:`MseRun.kernel_report`.  Any other failure of the guest raises
    :class:`~vdev.qemu.guest.GuestError`, never wrapped in an exception group.
    ``patch`` puts the modules it touches, rebuilt (:func:`vdev.guest.patched`), in
    place of the stock ones.  ``program`` is an ``mse-fault`` binary (static) to run
    in place of the initramfs's, for a changed ``guest/mse-fault.c`` before ``make guest``.
    """
    if patch is not None:
        artefacts = await trio.to_thread.run_sync(functools.partial(patched, artefacts, patch))
    started = time.monotonic()
    provenance = collect(artefacts, qemu=Path(binary) if binary is not None else None)
    device = MemBar(size=config.size, mapping=config.membar_mapping)
    # A short directory: UNIX socket paths are limited to 107 bytes, workdir may be deep.
    socket_dir = Path(tempfile.mkdtemp(prefix="vdev-mse-"))
    socket = socket_dir / "membar.sock"
    machine = GuestMachine(
        kernel=artefacts.kernel,
        initrd=artefacts.initrd,
        devices=config.qemu_devices(socket),
        run=["pci-list", config.guest_command(), "pci-list"],
        # Behind a root port, the PCI core's account of a bus reset (how long the link took, a device
        # that did not come back) is at info level: keep it on the console.
        kernel_loglevel=7 if config.topology == "root-port" else 5,
        files={"/bin/mse-fault": await trio.Path(program).read_bytes()} if program is not None else None,
        smp=config.smp,
        memory=config.memory_mib * MiB,
        timeout=config.timeout,
        binary=binary,
        workdir=workdir,
    )
    toggle = functools.partial(device.command_control.toggle_every, config.toggle_period, count=config.toggles)
    run = functools.partial(
        MseRun,
        kernel=artefacts.name,
        release=artefacts.release,
        config=config,
        console_log=workdir / "console.log",
        provenance=provenance,
        repeat=repeat,
    )
    try:
        async with served(device, socket), machine as vm:
            async for result in vm:
                if on_result is not None:
                    on_result(result)
                if result.kind == "mse.ready" and config.mode in ("server", "combined"):
                    # As the device's own task, which holds the device's lock while it runs: each flip is
                    # then ordered against the accesses the serving thread answers, in the log as it happened.
                    device.start_soon(toggle)
            await vm.wait_exit()
            server = ServerLog.from_events(device.events)
            # Read BAR0 with MEM on, as the last owner left it or as the device sets it now.
            device.command_control.force(memory=True)
            memory = bytes(device.bar(0).memory)
    except BaseException as exc:
        error = guest_error_in(exc)
        if error is None:
            raise
        if not isinstance(error, GuestKernelError):
            raise error from exc
        server = ServerLog.from_events(device.events)
        # The epoch it happened in, by the doorbells the server saw (0: MEM on since the start).
        epoch = server.doorbells[-1] if server.doorbells else "none yet"
        return run(
            results=[dict(result.data) for result in machine.results],
            server=server,
            verdicts=[
                Verdict(
                    "completed",
                    False,
                    f"ended by a kernel problem after {time.monotonic() - started:.1f} s, in guest epoch {epoch}",
                ),
                Verdict("kernel_clean", False, error.problems[0].strip()),
            ],
            boot_seconds=machine.boot_seconds,
            seconds=time.monotonic() - started,
            kernel_report=error.report,
        )
    finally:
        shutil.rmtree(socket_dir, ignore_errors=True)
    results: list[Mapping[str, Any]] = [dict(result.data) for result in vm.results]
    verdicts = analyse(
        config.mode,
        results,
        server,
        memory,
        kernel_problems=vm.kernel_problems,
        console=vm.console_log.read_text(errors="replace"),
        topology=config.topology,
    )
    return run(
        results=results,
        server=server,
        verdicts=verdicts,
        boot_seconds=vm.boot_seconds,
        seconds=time.monotonic() - started,
    )


def guest_error_in(exc: BaseException) -> GuestError | None:
    """The guest harness's error in ``exc``, looking inside exception groups (nurseries wrap it)."""
    if isinstance(exc, GuestError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = guest_error_in(inner)
            if found is not None:
                return found
    return None


# -- the report ---------------------------------------------------------------------------


def faults_per_enable(latency: Sequence[Mapping[str, Any]]) -> list[int]:
    """Faults the guest took to reach every page of BAR0 once after each quiet enable (first touch plus walk).

    The count that tells the kernels' fault paths apart: 1 when the first
    fault maps the whole mapping (6.1), one per huge page when huge faults
    serve an aligned mapping (6.12+), one per 4 KiB page otherwise, and 0
    when the kernel has mapped everything before the first touch.
    """
    return [
        entry["faults_first_touch"] + entry["faults_walk"]
        for entry in latency
        if entry.get("faults_first_touch", -1) >= 0 and entry.get("faults_walk", -1) >= 0
    ]


def verdict_counts(runs: Sequence[MseRun]) -> dict[str, dict[str, dict[str, int]]]:
    """Kernel -> mode -> verdict -> how many of that kernel's repeats passed it (``"runs"``: how many ran).

    A verdict a run never reached (it ended early) counts as not passed.
    """
    counts: dict[str, dict[str, dict[str, int]]] = {}
    names: dict[tuple[str, str], list[str]] = {}
    for run in runs:
        key = (run.kernel, run.config.mode)
        for verdict in run.verdicts:
            if verdict.name not in names.setdefault(key, []):
                names[key].append(verdict.name)
    for run in runs:
        key = (run.kernel, run.config.mode)
        entry = counts.setdefault(run.kernel, {}).setdefault(run.config.mode, {"runs": 0})
        entry["runs"] += 1
        passed = {verdict.name for verdict in run.verdicts if verdict.passed}
        for name in names[key]:
            entry[name] = entry.get(name, 0) + (name in passed)
    return counts


def write_report(
    runs: Sequence[MseRun],
    path: Path,
    *,
    plot: Path | None,
    matrix: Sequence[MseRun] = (),
    matrix_seconds: float = 0.0,
) -> dict[str, Any]:
    """``experiment.json``: the machine, every run's data and verdicts, and a per-kernel summary.

    The summary gives, per kernel and mode, how many of the repeats passed
    each verdict and the components that ran; the medians are over all repeats.
    ``fault_matrix`` holds the fault matrix's table, its runs and the seconds its boots took.
    """
    summary: dict[str, Any] = {}
    counts = verdict_counts(runs)
    for run in runs:
        entry = summary.setdefault(run.kernel, {"release": run.release, "provenance": run.provenance.to_json()})
        mode = run.config.mode
        if mode in entry:
            continue
        same = [r.to_json() for r in runs if r.kernel == run.kernel and r.config.mode == mode]
        quiet = [ns for data in same for ns in data["first_touch_ns"]["quiet"]]
        loaded = [ns for data in same for ns in data["first_touch_ns"]["under_load"]]
        walks = [ns for data in same for ns in data["walk_ns"]]
        enables = [ns for data in same for ns in data["enable_ns"]["quiet"]]
        faults = [n for data in same for n in data["faults_per_enable"]]
        entry[mode] = {
            "repeats": len(same),
            "passed_all": sum(data["passed"] for data in same),
            "verdicts_passed": {k: v for k, v in counts[run.kernel][mode].items() if k != "runs"},
            "sigbus": [data["sigbus"]["total"] for data in same],
            "first_touch_us_quiet_median": _us(statistics.median(quiet) if quiet else None),
            "first_touch_us_under_load_median": _us(statistics.median(loaded) if loaded else None),
            "walk_us_median": _us(statistics.median(walks) if walks else None),
            "enable_us_quiet_median": _us(statistics.median(enables) if enables else None),
            "faults_per_enable": sorted(faults),
            "storm_enables": sum(data["storm"]["cycles"] for data in same if data["storm"]),
            "storm_sigbus": sum(data["storm"]["sigbus"] for data in same if data["storm"]),
        }
    document = {
        "experiment": "mse-fault: concurrent faults on a vfio-pci BAR mapping while COMMAND.MEM toggles",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": {"kernel": platform.release(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "summary": summary,
        "plot": str(plot) if plot else None,
        "runs": [run.to_json() for run in runs],
    }
    if matrix:
        recorded = [run.to_json() for run in matrix]
        document["fault_matrix"] = {
            "seconds": round(matrix_seconds, 1),
            "table": fault_matrix_table(recorded),
            "runs": recorded,
        }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n")
    return document


def markdown_summary(runs: Sequence[MseRun], *, matrix: Sequence[MseRun] = (), matrix_seconds: float = 0.0) -> str:
    """A table per kernel and mode: each verdict's passes out of the repeats, and the components that ran.

    With ``matrix``, the fault matrix's table follows.
    """
    lines: list[str] = []
    for kernel, modes in verdict_counts(runs).items():
        first = next(run for run in runs if run.kernel == kernel)
        p = first.provenance
        package = f"{p.kernel_package} {p.kernel_package_version}" if p.kernel_package else "no Debian package"
        if p.kernel_patch:
            package += f", vfio modules rebuilt with `{p.kernel_patch}` (sha256 {(p.kernel_patch_sha256 or '')[:12]})"
        lines += [
            f"### {kernel}: {package} ({first.release})",
            "",
            f"QEMU {p.qemu_package_version or p.qemu_version}, libvfio-user {(p.libvfio_user_revision or '?')[:12]}, "
            f"vdev {p.vdev_commit or p.vdev_version}",
            "",
            "| mode | verdict | passed |",
            "|---|---|---|",
        ]
        known = known_failures(p)
        for mode, counts in modes.items():
            total = counts["runs"]
            for name, n in counts.items():
                if name != "runs":
                    note = f" (recorded finding: {known[name]})" if name in known else ""
                    lines.append(f"| {mode} | `{name}` | {n}/{total}{note} |")
        problems = [
            f"* {run.config.mode} #{run.repeat}: `{verdict.detail}`"
            for run in runs
            if run.kernel == kernel
            for verdict in run.verdicts
            if verdict.name == "kernel_clean" and not verdict.passed
        ]
        if problems:
            lines += ["", "Kernel problems (each run's first report line):", "", *problems]
        lines.append("")
        storms = [run.report.storm for run in runs if run.kernel == kernel and run.report.storm]
        if storms:
            lines += [
                f"Enables under load (storm): {sum(s['cycles'] for s in storms)} in {len(storms)} runs, "
                f"{storms[0]['touchers']} touchers each, {sum(s['sigbus'] for s in storms)} SIGBUS with MEM on, "
                f"{min(s['faults_per_cycle_min'] for s in storms)}-{max(s['faults_per_cycle_max'] for s in storms)} "
                "faults per enable.",
                "",
            ]
        latency = [entry for run in runs if run.kernel == kernel for entry in run.report.latency]
        faults = faults_per_enable(latency)
        if faults:
            lines += [
                f"Faults to reach all {latency[0]['pages'] + 1} pages of BAR0 after a quiet enable: "
                f"median {statistics.median(faults):g} (min {min(faults)}, max {max(faults)}, {len(faults)} enables).",
                "",
            ]
        enables = [ns for run in runs if run.kernel == kernel for ns in run.report.enable_ns("latency")]
        if enables:
            lines += [
                f"The enabling COMMAND write of a quiet enable: median {_us(statistics.median(enables))} µs "
                f"(min {_us(min(enables))}, max {_us(max(enables))}, {len(enables)} enables).",
                "",
            ]
    if matrix:
        lines += [
            "### Fault matrix: faults per enable",
            "",
            f"One boot per cell, quiet enables only (`{matrix[0].config.guest_command()}` with the cell's size "
            f"and alignment); {len(matrix)} boots in {matrix_seconds:.0f} s. Faults per enable: "
            "what reaching every page of BAR0 took after an enable (first touch plus a walk).",
            "",
            fault_matrix_markdown(fault_matrix_table([run.to_json() for run in matrix])),
        ]
    return "\n".join(lines)


def _us(ns: float | None) -> float | None:
    return None if ns is None else round(ns / 1000, 1)


def plot_runs(runs: Sequence[MseRun], path: Path) -> None:
    """Three panels: first touch after enable, a walk of BAR0 after enable, SIGBUS per disabled epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    guest_runs = [run for run in runs if run.config.mode == "guest"]
    figure, (touch, walk, faults) = plt.subplots(1, 3, figsize=(15, 4.5))
    kernels = list(dict.fromkeys(run.kernel for run in guest_runs))
    by_kernel = {kernel: [run for run in guest_runs if run.kernel == kernel] for kernel in kernels}
    labels = [f"{kernel}\n{runs_of[0].provenance.kernel_package_version}" for kernel, runs_of in by_kernel.items()]
    # Every repeat of a kernel pooled into one column.
    reports = [
        GuestReport.from_results(result for run in runs_of for result in run.results) for runs_of in by_kernel.values()
    ]

    quiet = [[e["first_touch_ns"] / 1000 for e in report.latency] for report in reports]
    loaded = [
        [
            e["first_touch_ns"] / 1000
            for e in report.epochs
            if e["phase"] == "toggle" and e["first_touch_ns"] is not None
        ]
        for report in reports
    ]
    for index, (q, lo) in enumerate(zip(quiet, loaded)):
        touch.scatter([index - 0.12] * len(q), q, color="tab:blue", label="quiet" if index == 0 else None)
        touch.scatter(
            [index + 0.12] * len(lo),
            lo,
            color="tab:orange",
            marker="x",
            label="4 threads faulting" if index == 0 else None,
        )
    touch.set_xticks(range(len(labels)), labels)
    if any(quiet) or any(loaded):  # runs a kernel problem ended early measured nothing
        touch.set_yscale("log")
    touch.set_ylabel("µs")
    touch.set_title("first BAR0 access after MEM is set")
    touch.legend()

    width = 0.38
    walks = [statistics.median(e["walk_ns"] for e in r.latency) / 1000 if r.latency else 0 for r in reports]
    mapped = [statistics.median(e["walk_mapped_ns"] for e in r.latency) / 1000 if r.latency else 0 for r in reports]
    walk.bar([i - width / 2 for i in range(len(labels))], walks, width, label="right after enable")
    walk.bar([i + width / 2 for i in range(len(labels))], mapped, width, label="again (all mapped)")
    walk.set_xticks(range(len(labels)), labels)
    walk.set_ylabel("µs (median)")
    walk.set_title("reading every page of BAR0 after the first")
    walk.legend()

    for colour, (kernel, runs_of) in enumerate(by_kernel.items()):
        for index, run in enumerate(runs_of):
            report = run.report
            disabled = [e for e in report.epochs if e["state"] == "disabled" and e["phase"] == "toggle"]
            faults.plot(
                range(1, len(disabled) + 1),
                [e["sigbus"] for e in disabled],
                marker="o",
                color=f"C{colour}",
                label=kernel if index == 0 else None,
            )
    faults.set_xlabel("disabled epoch (under load), one line per repeat")
    faults.set_ylabel("SIGBUS")
    faults.set_title(f"SIGBUS per disabled epoch ({guest_runs[0].config.threads if guest_runs else 0} threads)")
    faults.legend()

    if guest_runs:
        config = guest_runs[0].config
        where = "one page off its alignment (4 KiB faults only)" if config.misaligned else "aligned to its size"
        figure.suptitle(f"mse-fault: BAR0 of {config.size}B mapped {where}; TCG guests, {config.smp} vCPUs")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


# -- the fault matrix ----------------------------------------------------------------------------

#: The seed's proposal (issue 18): 6.1's vfio-pci prefaulting every user mapping when memory is enabled.
PREFAULT_PATCH = Path(__file__).resolve().parent.parent / "variants" / "vfio-pci-6.1-prefault-on-enable.diff"


@dataclass(frozen=True)
class MatrixCell:
    """One boot of the fault matrix: a BAR0 size, mapped aligned or not, on the stock or the prefault modules."""

    size: str
    misaligned: bool = False
    prefault: bool = False
    #: membar's mapping policy; ``keep`` where revoking would make the server save a whole populated BAR
    #: at every disable (1 GiB misaligned: QEMU's request then times out).
    mapping: str = ""

    @property
    def slug(self) -> str:
        return f"{self.size}-{'misaligned' if self.misaligned else 'aligned'}{'-prefault' if self.prefault else ''}"

    def applies_to(self, release: str) -> bool:
        """The prefault variant is a patch to 6.1's vfio-pci: it runs on 6.1 kernels only."""
        return not self.prefault or release.startswith("6.1.")

    def config(self, topology: str) -> MseConfig:
        """Quiet enables only: one toggle cycle, four timed enables, no reset, fork, D3hot, hot reset, close or storm.

        The boot is the cell's cost; everything but the latency phase is
        left out so that it is short.
        """
        return MseConfig(
            mode="guest",
            threads=2,
            cycles=1,
            latency_cycles=4,
            storm_cycles=0,
            reset=False,
            fork=False,
            d3hot=False,
            hot_reset=False,
            close=False,
            size=self.size,
            misaligned=self.misaligned,
            mapping=self.mapping,
            topology=topology,
        )


#: The fault matrix each kernel boots through after the main runs.
FAULT_MATRIX = (
    MatrixCell("4K"),
    MatrixCell("2M"),
    MatrixCell("2M", misaligned=True),
    MatrixCell("1G"),
    MatrixCell("1G", misaligned=True, mapping="keep"),
    MatrixCell(MseConfig.size),
    MatrixCell(MseConfig.size, prefault=True),
)


def fault_matrix_table(runs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per kernel, BAR0 size, alignment and variant, from runs as :meth:`MseRun.to_json` records them.

    Faults per enable is what reaching every page of BAR0 took after each
    quiet enable (:func:`faults_per_enable`): median, range and how many
    enables, pooled over the runs of a cell; first touch is the quiet
    first-touch latency.  ``passed`` counts the runs whose verdicts all passed.
    """
    rows: dict[tuple[str, str, bool, str, str], dict[str, Any]] = {}
    for run in runs:
        config = run["config"]
        variant = Path(run["provenance"]["kernel_patch"]).stem if run["provenance"].get("kernel_patch") else "stock"
        key = (run["kernel"], config["size"], bool(config["misaligned"]), config["membar_mapping"], variant)
        row = rows.setdefault(
            key,
            {
                "kernel": run["kernel"],
                "release": run["release"],
                "size": config["size"],
                "alignment": "misaligned" if config["misaligned"] else "aligned",
                "membar_mapping": config["membar_mapping"],
                "variant": variant,
                "pages": (run.get("device") or {}).get("pages"),
                "runs": 0,
                "passed": 0,
                "faults": [],
                "first_touch_ns": [],
            },
        )
        row["runs"] += 1
        row["passed"] += bool(run["passed"])
        row["faults"] += run["faults_per_enable"]
        row["first_touch_ns"] += run["first_touch_ns"]["quiet"]
    table = []
    for row in rows.values():
        faults, touches = row.pop("faults"), row.pop("first_touch_ns")
        row["enables"] = len(faults)
        row["faults_median"] = statistics.median(faults) if faults else None
        row["faults_min"] = min(faults) if faults else None
        row["faults_max"] = max(faults) if faults else None
        row["first_touch_us_median"] = _us(statistics.median(touches) if touches else None)
        table.append(row)
    return table


def fault_matrix_markdown(table: Sequence[Mapping[str, Any]]) -> str:
    """The fault matrix as one Markdown table."""
    lines = [
        "| kernel | BAR0 | mapped | membar policy | variant | faults per enable, median (range) | enables "
        "| first touch, µs (median) | runs passing every verdict |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in table:
        if row["enables"]:
            faults = f"{row['faults_median']:g} ({row['faults_min']}–{row['faults_max']})"
        else:
            faults = "none measured"
        pages = f", {row['pages']} pages" if row["pages"] else ""
        lines.append(
            f"| {row['kernel']} ({row['release']}) | {row['size']}{pages} | {row['alignment']} "
            f"| {row['membar_mapping']} | {row['variant']} "
            f"| {faults} | {row['enables']} | {row['first_touch_us_median']} | {row['passed']}/{row['runs']} |"
        )
    return "\n".join(lines) + "\n"


# -- the command line ---------------------------------------------------------------------------


class _Progress:
    """One line per milestone of a run, so a person watching sees it move."""

    SHOWN = (
        "init.ready",
        "mse.bound",
        "mse.ready",
        "mse.reset",
        "mse.fork",
        "mse.storm.progress",
        "mse.storm",
        "mse.d3hot",
        "mse.hot_reset",
        "mse.close.step",
        "mse.combined",
        "mse.done",
        "mse.error",
    )

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def __call__(self, result: GuestResult) -> None:
        if result.kind not in self.SHOWN:
            return
        data = {k: v for k, v in result.data.items() if k not in ("kind", "modules")}
        text = ", ".join(f"{k}={v}" for k, v in data.items())
        print(f"{self.prefix} {result.at:6.1f}s {result.kind}: {text}"[:200], file=sys.stderr, flush=True)


@dataclass
class _Outcome:
    """What :func:`_run_matrix` ran: the main runs, the fault matrix's runs and the seconds the matrix took."""

    runs: list[MseRun] = field(default_factory=list)
    matrix: list[MseRun] = field(default_factory=list)
    matrix_seconds: float = 0.0


def _say_verdicts(prefix: str, run: MseRun) -> None:
    for verdict in run.verdicts:
        mark = "ok  " if verdict.passed else "FAIL"
        print(f"{prefix}   {mark} {verdict.name}: {verdict.detail}", file=sys.stderr, flush=True)
    if run.kernel_report:
        report = "\n".join(f"{prefix}   | {line}" for line in run.kernel_report)
        print(f"{prefix}   the kernel's report:\n{report}", file=sys.stderr, flush=True)


async def _run_fault_matrix(
    artefacts: GuestArtefacts, label: str, args: argparse.Namespace, say: Callable[[str], None]
) -> list[MseRun]:
    """Each cell of :data:`FAULT_MATRIX` that applies to the kernel, one boot each, on the stock or variant modules."""
    runs: list[MseRun] = []
    cells = [cell for cell in FAULT_MATRIX if cell.applies_to(artefacts.release)]
    prefault = None
    for number, cell in enumerate(cells, start=1):
        booted = artefacts
        if cell.prefault:
            if prefault is None:
                prefault = await trio.to_thread.run_sync(
                    functools.partial(patched, artefacts, PREFAULT_PATCH, progress=say)
                )
            booted = prefault
        config = cell.config(args.topology)
        prefix = f"[matrix {number}/{len(cells)} {label} {cell.slug}]"
        print(f"{prefix} running {config.guest_command()}", file=sys.stderr, flush=True)
        workdir = args.out / "experiment" / f"{label}-matrix-{cell.slug}"
        workdir.mkdir(parents=True, exist_ok=True)
        run = await _run_one(booted, config, workdir, prefix, 1, args.program)
        _say_verdicts(prefix, run)
        runs.append(run)
    return runs


async def _run_matrix(args: argparse.Namespace) -> _Outcome:
    outcome = _Outcome()
    runs = outcome.runs
    kernels, modes = args.kernels.split(), args.modes.split()
    logs = args.out / "experiment"
    total = len(kernels) * len(modes) * args.repeat
    for kernel in kernels:
        say = functools.partial(print, f"[{kernel}]", file=sys.stderr, flush=True)
        artefacts = await trio.to_thread.run_sync(
            functools.partial(find_kernel, kernel, require=("vfio_pci",), progress=say)
        )
        # A kernel of one's own is named by its (absolute) path; its logs go under the last component.
        label = Path(artefacts.name).name
        stock = artefacts
        if args.patch is not None:
            artefacts = await trio.to_thread.run_sync(functools.partial(patched, artefacts, args.patch, progress=say))
        for repeat in range(1, args.repeat + 1):
            for mode in modes:
                config = MseConfig(
                    mode=mode,
                    threads=args.threads,
                    cycles=args.cycles,
                    period_ms=args.period_ms,
                    latency_cycles=args.latency_cycles,
                    seconds=args.seconds,
                    toggles=args.toggles,
                    toggle_period=args.toggle_period,
                    size=args.size,
                    mapping=args.mapping,
                    misaligned=args.misaligned,
                    reset=not args.no_reset,
                    storm_cycles=args.storm_cycles,
                    storm_processes=args.storm_processes,
                    topology=args.topology,
                )
                prefix = f"[{len(runs) + 1}/{total} {label} {mode} #{repeat}]"
                print(f"{prefix} booting {describe(collect(artefacts))}", file=sys.stderr, flush=True)
                print(f"{prefix} running {config.guest_command()}", file=sys.stderr, flush=True)
                workdir = logs / f"{label}-{mode}-{repeat}"
                workdir.mkdir(parents=True, exist_ok=True)
                run = await _run_one(artefacts, config, workdir, prefix, repeat, args.program)
                _say_verdicts(prefix, run)
                runs.append(run)
        if args.fault_matrix:
            started = time.monotonic()
            outcome.matrix += await _run_fault_matrix(stock, label, args, say)
            outcome.matrix_seconds += time.monotonic() - started
    return outcome


async def _run_one(
    artefacts: GuestArtefacts, config: MseConfig, workdir: Path, prefix: str, repeat: int, program: Path | None
) -> MseRun:
    """One run; a guest that times out or exits early becomes a failed ``completed`` verdict, not an exception."""
    # The server's own log (libvfio-user's complaints while QEMU tears down, say)
    # goes next to the console log instead of between the progress lines.
    server_log = logging.FileHandler(workdir / "server.log", mode="w")
    logging.getLogger("vdev").addHandler(server_log)
    started = time.monotonic()
    try:
        return await run_mse(
            artefacts, config, workdir=workdir, on_result=_Progress(prefix), repeat=repeat, program=program
        )
    except GuestError as exc:
        # Keep going: the other runs' results are worth having, and the report says what broke.
        return MseRun(
            kernel=artefacts.name,
            release=artefacts.release,
            config=config,
            results=[],
            server=ServerLog(),
            verdicts=[Verdict("completed", False, str(exc).splitlines()[0])],
            console_log=workdir / "console.log",
            boot_seconds=None,
            seconds=time.monotonic() - started,
            provenance=collect(artefacts),
            repeat=repeat,
        )
    finally:
        logging.getLogger("vdev").removeHandler(server_log)
        server_log.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vdev_experiments.mse", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--kernels", default=" ".join(DEFAULT_KERNELS), help="guest kernel sets (make guest KERNELS=...)"
    )
    parser.add_argument("--modes", default=" ".join(MODES), help="guest and/or server")
    parser.add_argument("--out", type=Path, default=Path("results"), help="where experiment.json/.png go")
    defaults = MseConfig()
    parser.add_argument("--threads", type=int, default=defaults.threads)
    parser.add_argument("--cycles", type=int, default=defaults.cycles)
    parser.add_argument("--period-ms", type=int, default=defaults.period_ms)
    parser.add_argument("--latency-cycles", type=int, default=defaults.latency_cycles)
    parser.add_argument("--seconds", type=int, default=defaults.seconds)
    parser.add_argument("--toggles", type=int, default=defaults.toggles)
    parser.add_argument("--toggle-period", type=float, default=defaults.toggle_period)
    parser.add_argument("--size", default=defaults.size, help="membar BAR0 size (4K to 1G, a power of two)")
    parser.add_argument(
        "--mapping",
        default=defaults.mapping,
        choices=("", "keep", "revoke", "discard"),
        help="membar's mapping policy (default: revoke in guest mode, keep otherwise); keep spares the server "
        "saving a big BAR's contents at every disable",
    )
    parser.add_argument(
        "--storm-cycles", type=int, default=defaults.storm_cycles, help="enables under load after the quiet phases"
    )
    parser.add_argument(
        "--storm-processes", type=int, default=defaults.storm_processes, help="child processes in the storm"
    )
    parser.add_argument("--misaligned", action="store_true", help="map BAR0 off its alignment (no huge-page faults)")
    parser.add_argument("--no-reset", action="store_true", help="guest mode: no VFIO_DEVICE_RESET under load")
    parser.add_argument(
        "--topology",
        default=defaults.topology,
        choices=TOPOLOGIES,
        help="membar on the q35 root bus, or behind a PCIe root port (where a hot reset can run)",
    )
    parser.add_argument("--repeat", type=int, default=1, help="boot each kernel and mode this many times")
    parser.add_argument(
        "--program",
        type=Path,
        help="a static mse-fault binary to run instead of the initramfs's (gcc -static -Iguest guest/mse-fault.c)",
    )
    parser.add_argument(
        "--patch", type=Path, help="rebuild the vfio modules this kernel patch touches and load them (Debian sets)"
    )
    parser.add_argument(
        "--no-fault-matrix",
        dest="fault_matrix",
        action="store_false",
        help="skip the fault matrix (a short boot per BAR0 size, alignment and variant after the main runs)",
    )
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    for mode in args.modes.split():
        try:
            MseConfig(
                mode=mode,
                mapping=args.mapping,
                seconds=args.seconds,
                toggles=args.toggles,
                toggle_period=args.toggle_period,
            )
        except ValueError as exc:
            parser.error(str(exc).splitlines()[0])

    try:
        outcome = trio.run(_run_matrix, args)
    except GuestSetupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    runs = outcome.runs
    plot = args.out / "experiment.png"
    plot_runs(runs, plot)
    report = args.out / "experiment.json"
    write_report(runs, report, plot=plot, matrix=outcome.matrix, matrix_seconds=outcome.matrix_seconds)
    summary = markdown_summary(runs, matrix=outcome.matrix, matrix_seconds=outcome.matrix_seconds)
    (args.out / "experiment.md").write_text(summary)
    print(summary)
    print(
        f"report: {report} (summary {args.out / 'experiment.md'}); plot: {plot}; "
        f"console logs under {args.out / 'experiment'}",
        file=sys.stderr,
    )
    # Failed verdicts are findings (the report lists them); only a run that could not finish is an error.
    return 0 if all(run.verdict("completed").passed for run in runs + outcome.matrix) else 1


if __name__ == "__main__":
    sys.exit(main())
