"""The kernel's own vfio selftests, run in a guest against vdev's devices: ``make kselftest``.

Linux ships tests of the vfio-pci paths vdev exists to exercise
(``tools/testing/selftests/vfio``): ``vfio_pci_device_test`` (config space,
BAR mmap, MSI/MSI-X, reset), ``vfio_dma_mapping_test``,
``vfio_dma_mapping_mmio_test`` (IOMMU-mapping a BAR mmap) and
``vfio_pci_driver_test`` (a real DMA engine through the selftests' small
driver framework).  ``make guest`` builds them from Debian's linux-source of
the newest guest kernel (``tools/guest.sh``); this module boots that kernel
with ``membar`` (a 1 GiB mappable BAR, MSI, MSI-X, FLR) and ``ioat`` (the
selftests' ioat driver's DMA engine) attached, runs each program against its
device and writes ``results/kselftest.json`` — per program, fixture, variant
and test: pass, fail or skip with the reason — and each program's TAP output.

How the guest is set up, and why:

* The programs are added to the initramfs of this run only (``files=``),
  from ``.deps/guest/kselftest/bin``; ``guest/bin/kselftest`` runs one and
  reports its test listing, its TAP output and its exit status.
* Debian's kernels have no ``CONFIG_IOMMUFD``.  Without ``/dev/iommu`` the
  programs run in type1v2 mode (``VDEV_IOMMU_MODE``, read by a constructor
  linked into them) and the iommufd variants are excluded; the report lists
  them as skipped for that reason.
* 4 GiB of memory, ``hugepagesz=1G hugepages=1 hugepagesz=2M hugepages=16``
  and a CPU with 1 GiB pages (``pdpe1gb``), for the 2 MiB and 1 GiB hugetlb
  variants of ``vfio_dma_mapping_test``.
* Transparent huge pages for shared anonymous memory (``shmem_enabled``
  ``always``).  The driver test's fixture maps 1 GiB + 2 MiB of
  ``MAP_SHARED | MAP_ANONYMOUS`` memory; with the guest IOMMU in caching
  mode every page the guest maps becomes one DMA_MAP to the server.  In
  4 KiB pages that is about 262,000 mappings, more than libvfio-user can
  hold (and than a process may mmap); in 2 MiB pages it is 513 per fixture.
* QEMU's stderr is searched for DMA_MAPs the server refused
  (``vfio_container_dma_map(...) = -errno``), and the server's log for
  libvfio-user's own refusals, so a run that silently lost mappings says so.

Run it as ``make kselftest`` or ``python -m vdev_experiments.kselftest``.
"""

from __future__ import annotations

import argparse
import base64
import collections
import contextlib
import json
import logging
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import trio

from vdev.model.device import Device
from vdev.model.events import DeviceEvent, DmaMap, Violation
from vdev.provenance import collect
from vdev.qemu.cmdline import MiB
from vdev.qemu.guest import GuestArtefacts, GuestMachine, guest_dir
from vdev.testing import served, vfio_user_pci
from vdev_devices.ioat import Ioat
from vdev_devices.membar import MemBar

#: The command that builds the selftests (with a 7.x kernel to build them from).
BUILD_COMMAND = 'make guest KERNELS="trixie-backports"'
#: Guest memory: the 1 GiB hugetlb variant, the driver test's 1 GiB buffer and the kernel.
GUEST_MEMORY = 4096 * MiB
GUEST_APPEND = "hugepagesz=1G hugepages=1 hugepagesz=2M hugepages=16"
GUEST_CPU = "qemu64,+pdpe1gb"
SHMEM_THP = "always"
#: What refused DMA_MAPs look like on QEMU's stderr and in the server's log.
QEMU_MAP_REFUSED = re.compile(r"vfio_container_dma_map\(.*\) = -\d+")
SERVER_MAP_REFUSED = re.compile(r"failed to add DMA region")
#: The reason recorded for variants that need iommufd on a kernel without it.
NO_IOMMUFD = "not run: the guest kernel has no /dev/iommu (Debian builds it without CONFIG_IOMMUFD)"


@dataclass(frozen=True)
class Selftests:
    """The programs ``make guest`` built, and the source they came from."""

    directory: Path
    programs: Mapping[str, Path]
    source_package: str
    source_version: str
    kernel: str
    manifest: Mapping[str, Any]

    @classmethod
    def find(cls, directory: Path | None = None) -> Selftests:
        """The built selftests; :class:`FileNotFoundError` naming the command that builds them."""
        where = directory or guest_dir() / "kselftest"
        manifest_path = where / "manifest.json"
        if not manifest_path.exists():
            raise FileNotFoundError(f"the vfio selftests are not built in {where}; run `{BUILD_COMMAND}`")
        manifest = json.loads(manifest_path.read_text())
        programs = {name: where / "bin" / name for name in manifest["programs"]}
        missing = [name for name, path in programs.items() if not path.exists()]
        if missing:
            raise FileNotFoundError(f"{', '.join(missing)} missing from {where / 'bin'}; run `{BUILD_COMMAND}`")
        return cls(
            directory=where,
            programs=programs,
            source_package=manifest["source_package"],
            source_version=manifest["source_version"],
            kernel=manifest["kernel"],
            manifest=manifest,
        )


@dataclass(frozen=True)
class Target:
    """A device the guest sees, and in which PCI slot."""

    name: str
    slot: int
    make: Callable[[], Device]

    @property
    def addr(self) -> str:
        """The guest's name for the function: what the selftests take as their argument."""
        return f"0000:00:{self.slot:02x}.0"


#: membar with a 1 GiB BAR0 (the 1 GiB mmio variants) and MSI, MSI-X, FLR; ioat for the driver test.
TARGETS = (
    Target("membar", 0x3, lambda: MemBar(size="1G")),
    Target("ioat", 0x4, Ioat),
)
#: Which program runs against which device, in order.
PLAN: tuple[tuple[str, str], ...] = (
    ("vfio_pci_device_test", "membar"),
    ("vfio_dma_mapping_test", "membar"),
    ("vfio_dma_mapping_mmio_test", "membar"),
    ("vfio_pci_driver_test", "ioat"),
)


# -- parsing what the programs print ------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One fixture/variant/test of a program, and how it ended."""

    name: str
    fixture: str
    variant: str
    test: str
    status: str  # pass, fail, skip, xfail, xpass
    reason: str | None = None


def parse_listing(text: str) -> list[tuple[str, str, str]]:
    """``(fixture, variant, test)`` for every case a program's ``-l`` lists, in the order it runs them.

    The harness prints each fixture's variants and tests side by side
    (``%-20s %-25s %s``), blank where a column has run out, and runs every
    variant with every test.

    >>> parse_listing("# FIXTURE            VARIANT                   TEST\\n"
    ...               "f                    a                         t1\\n"
    ...               "                     b                         t2\\n")
    [('f', 'a', 't1'), ('f', 'a', 't2'), ('f', 'b', 't1'), ('f', 'b', 't2')]
    """
    blocks: list[tuple[str, list[str], list[str]]] = []
    started = False
    for line in text.splitlines():
        if line.startswith("# FIXTURE"):
            started = True
            continue
        if not started or not line.strip():
            continue
        if line.startswith("-----"):
            blocks.append(("", [], []))
            continue
        fixture, variant, test = _columns(line)
        if not blocks:
            blocks.append(("", [], []))
        if fixture:
            blocks[-1] = (fixture, blocks[-1][1], blocks[-1][2])
        if variant:
            blocks[-1][1].append(variant)
        if test:
            blocks[-1][2].append(test)
    return [
        (fixture, variant, test)
        for fixture, variants, tests in blocks
        for variant in variants or [""]
        for test in tests
    ]


def _columns(line: str) -> list[str]:
    """The three columns of a listing line; a name longer than its column pushes the next one right."""
    fields: list[str] = []
    position = 0
    for width in (20, 25):
        if line[position : position + 1] not in ("", " "):
            end = line.find(" ", position)
            end = len(line) if end < 0 else end
            fields.append(line[position:end])
            position = max(position + width, end) + 1
        else:
            fields.append("")
            position += width + 1
    fields.append(line[position:].strip())
    return fields


_TAP_RESULT = re.compile(r"^(not ok|ok) \d+ (\S+)(?: # (SKIP|XFAIL|XPASS)\b ?(.*))?$")
_HARNESS_LINE = re.compile(r"^#\s+(RUN|OK|FAIL|SKIP)\s")


def parse_tap(text: str) -> dict[str, tuple[str, str | None]]:
    """Each test's status and reason from a program's TAP output, by ``fixture.variant.test`` name.

    A failure's reason is the last lines the test printed (its assertion).

    >>> parse_tap("#  RUN           f.t ...\\n# f.c:3:t:Expected 0 (0) == x (1)\\n"
    ...           "not ok 1 f.t\\nok 2 f.u # SKIP no MSI")
    {'f.t': ('fail', 'f.c:3:t:Expected 0 (0) == x (1)'), 'f.u': ('skip', 'no MSI')}
    """
    results: dict[str, tuple[str, str | None]] = {}
    said: list[str] = []
    for line in text.splitlines():
        match = _TAP_RESULT.match(line.strip())
        if match is None:
            if line.startswith("#  RUN"):
                said = []
            elif line.strip() and not _HARNESS_LINE.match(line):
                said.append(line.strip().removeprefix("# "))
            continue
        outcome, name, directive, text_after = match.groups()
        if directive:
            results[name] = (directive.lower(), text_after.strip() or None)
        elif outcome == "ok":
            results[name] = ("pass", None)
        else:
            results[name] = ("fail", "; ".join(said[-3:]) or None)
        said = []
    return results


@dataclass
class ProgramRun:
    """One program against one device: what it listed, what it reported, how it ended."""

    program: str
    device: str
    addr: str
    exit_status: int | None = None
    seconds: float | None = None
    iommufd: bool | None = None
    excluded_variants: list[str] = field(default_factory=list)
    listing: str = ""
    tap: str = ""
    cases: list[Case] = field(default_factory=list)

    @property
    def status(self) -> str:
        """``pass`` when every case passed or skipped, ``skip`` when the program skipped itself, else ``fail``."""
        if self.exit_status is None:
            return "fail"
        if self.exit_status == 4 and not self.cases:
            return "skip"
        if any(case.status in ("fail", "xpass") for case in self.cases) or self.exit_status not in (0, 4):
            return "fail"
        return "pass"

    def settle(self) -> None:
        """Build :attr:`cases` from the listing, the TAP output and the excluded variants."""
        reported = parse_tap(self.tap)
        cases = []
        for fixture, variant, test in parse_listing(self.listing):
            name = ".".join(part for part in (fixture, variant, test) if part)
            if name in reported:
                status, reason = reported.pop(name)
            elif variant in self.excluded_variants:
                status, reason = "skip", NO_IOMMUFD
            else:
                status, reason = "fail", f"no result: the program ended first (exit status {self.exit_status})"
            cases.append(Case(name, fixture, variant, test, status, reason))
        for name, (status, reason) in reported.items():  # reported but not listed: keep them all the same
            cases.append(Case(name, "", "", name, status, reason))
        self.cases = cases

    def counts(self) -> dict[str, int]:
        return dict(collections.Counter(case.status for case in self.cases))

    def to_json(self, tap_file: str) -> dict[str, Any]:
        return {
            "program": self.program,
            "device": self.device,
            "addr": self.addr,
            "status": self.status,
            "exit_status": self.exit_status,
            "seconds": self.seconds,
            "iommufd": self.iommufd,
            "excluded_variants": self.excluded_variants,
            "counts": self.counts(),
            "tap": tap_file,
            "cases": [asdict(case) for case in self.cases],
        }


# -- running -----------------------------------------------------------------------------------


@dataclass
class KselftestRun:
    """Everything one guest run of the selftests produced."""

    artefacts: GuestArtefacts
    selftests: Selftests
    programs: list[ProgramRun]
    devices: dict[str, Device]
    counts: dict[str, EventCounts]
    console_log: Path
    qemu_refusals: list[str]
    server_refusals: list[str]
    boot_seconds: float | None
    seconds: float
    error: str | None = None

    @property
    def passed(self) -> bool:
        return (
            self.error is None
            and all(run.status in ("pass", "skip") for run in self.programs)
            and not self.qemu_refusals
            and not self.server_refusals
        )


@dataclass
class EventCounts:
    """What a device did during the run, counted as it happened (the event log itself is bounded)."""

    kinds: collections.Counter[str] = field(default_factory=collections.Counter)
    map_sizes: collections.Counter[int] = field(default_factory=collections.Counter)
    violations: collections.Counter[str] = field(default_factory=collections.Counter)

    def __call__(self, event: DeviceEvent) -> None:
        self.kinds[event.kind] += 1
        if isinstance(event, DmaMap):
            self.map_sizes[event.size] += 1
        elif isinstance(event, Violation):
            self.violations[event.what] += 1

    def to_json(self) -> dict[str, Any]:
        return {
            "dma_maps": self.kinds["dma_map"],
            "dma_unmaps": self.kinds["dma_unmap"],
            "dma_map_sizes": {str(size): n for size, n in self.map_sizes.most_common(8)},
            "interrupts": self.kinds["irq"],
            "violations": dict(self.violations),
        }


class _Collect(logging.Handler):
    """Keeps the server log lines saying libvfio-user refused a DMA_MAP."""

    def __init__(self) -> None:
        super().__init__()
        self.refusals: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if SERVER_MAP_REFUSED.search(message):
            self.refusals.append(message)


async def run_kselftests(
    artefacts: GuestArtefacts,
    selftests: Selftests,
    *,
    plan: Sequence[tuple[str, str]] = PLAN,
    workdir: Path,
    binary: Path | None = None,
    timeout: float = 900.0,  # noqa: ASYNC109 - the guest machine's own deadline, as GuestMachine takes it
) -> KselftestRun:
    """Boot ``artefacts`` with the devices attached and run each ``(program, device)`` of ``plan``.

    Never raises for what happens in the guest: a run cut short keeps the
    results that arrived, and :attr:`KselftestRun.error` says what broke.
    """
    targets = {target.name: target for target in TARGETS}
    devices = {name: targets[name].make() for name in dict.fromkeys(device for _, device in plan)}
    runs = [ProgramRun(program, device, targets[device].addr) for program, device in plan]
    counts = {name: EventCounts() for name in devices}
    for name, device in devices.items():
        device.events.subscribe(counts[name])
    files: dict[str, bytes | str] = {
        f"/kselftest/{run.program}": selftests.programs[run.program].read_bytes() for run in runs
    }
    commands = [
        f"echo {SHMEM_THP} > /sys/kernel/mm/transparent_hugepage/shmem_enabled",
        "vfio-bind " + " ".join(targets[name].addr for name in devices),
        *(f"kselftest {run.program} {run.addr}" for run in runs),
    ]
    collector = _Collect()
    logging.getLogger("vdev").addHandler(collector)
    socket_dir = Path(tempfile.mkdtemp(prefix="vdev-kselftest-"))
    started = time.monotonic()
    chunks: dict[tuple[str, str], list[str]] = collections.defaultdict(list)
    pending = collections.deque(runs)
    error = None
    machine = GuestMachine(
        binary=binary,
        kernel=artefacts.kernel,
        initrd=artefacts.initrd,
        devices=[vfio_user_pci(socket_dir / f"{name}.sock", addr=hex(targets[name].slot)) for name in devices],
        run=commands,
        files=files,
        memory=GUEST_MEMORY,
        append=GUEST_APPEND,
        extra_args=["-cpu", GUEST_CPU],
        timeout=timeout,
        workdir=workdir,
    )
    try:
        async with contextlib.AsyncExitStack() as stack:
            for name, device in devices.items():
                await stack.enter_async_context(served(device, socket_dir / f"{name}.sock"))
            vm = await stack.enter_async_context(machine)
            async for result in vm:
                if result.kind in ("kselftest.list", "kselftest.tap"):
                    chunks[(result["test"], result.kind)].append(result["data"])
                elif result.kind == "kselftest.exit" and pending and pending[0].program == result["test"]:
                    run = pending.popleft()
                    run.exit_status = result["status"]
                    run.seconds = result["seconds"]
                    run.iommufd = result["iommufd"]
                    run.excluded_variants = list(result["excluded"])
                    run.listing = _decode(chunks.pop((run.program, "kselftest.list"), []))
                    run.tap = _decode(chunks.pop((run.program, "kselftest.tap"), []))
                    print(
                        f"kselftest: {run.program} on {run.device}: exit {run.exit_status} in {run.seconds} s",
                        file=sys.stderr,
                        flush=True,
                    )
                elif result.kind == "vfio.bind-error":
                    error = f"vfio-pci did not bind {result['addr']}: {result['message']}"
            await vm.wait_exit()
    except Exception as exc:  # the report says what broke; the cases that ran keep their results
        error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    finally:
        logging.getLogger("vdev").removeHandler(collector)
        shutil.rmtree(socket_dir, ignore_errors=True)
    (workdir / "initrd.img").unlink(missing_ok=True)  # the harness's combined initramfs: a build artefact
    for run in runs:
        run.settle()
    qemu_log = workdir / "qemu.log"
    qemu_stderr = qemu_log.read_text(errors="replace") if qemu_log.exists() else ""
    return KselftestRun(
        artefacts=artefacts,
        selftests=selftests,
        programs=runs,
        devices=devices,
        counts=counts,
        console_log=workdir / "console.log",
        qemu_refusals=[line for line in qemu_stderr.splitlines() if QEMU_MAP_REFUSED.search(line)],
        server_refusals=collector.refusals,
        boot_seconds=machine.boot_seconds,
        seconds=time.monotonic() - started,
        error=error,
    )


def _decode(chunks: list[str]) -> str:
    return base64.b64decode("".join(chunks)).decode(errors="replace")


# -- the report -------------------------------------------------------------------------------


def tap_name(run: ProgramRun) -> str:
    return f"{run.program}.{run.device}.tap"


def to_json(result: KselftestRun) -> dict[str, Any]:
    """The report: components, guest, devices, every program's cases, refused DMA_MAPs."""
    return {
        "passed": result.passed,
        "error": result.error,
        "provenance": collect(result.artefacts).to_json(),
        "selftests": dict(result.selftests.manifest),
        "guest": {
            "memory_mib": GUEST_MEMORY // MiB,
            "append": GUEST_APPEND,
            "cpu": GUEST_CPU,
            "shmem_thp": SHMEM_THP,
            "boot_seconds": result.boot_seconds,
        },
        "devices": {
            name: {"addr": target.addr, "params": {k: str(v) for k, v in result.devices[name].params.items()}}
            for target in TARGETS
            for name in [target.name]
            if name in result.devices
        },
        "programs": [run.to_json(f"kselftest/{tap_name(run)}") for run in result.programs],
        "device_events": {name: counts.to_json() for name, counts in result.counts.items()},
        "dma_map_refused": {"qemu": result.qemu_refusals[:20], "server": result.server_refusals[:20]},
        "seconds": round(result.seconds, 1),
    }


def write_report(result: KselftestRun, out: Path) -> dict[str, Any]:
    """``out/kselftest.json``, each program's TAP output and the console log under ``out/kselftest/``."""
    logs = out / "kselftest"
    logs.mkdir(parents=True, exist_ok=True)
    for run in result.programs:
        (logs / tap_name(run)).write_text(run.tap)
    if result.console_log.exists() and result.console_log.parent != logs:
        shutil.copy(result.console_log, logs / "console.log")
    report = to_json(result)
    (out / "kselftest.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def summary(result: KselftestRun) -> str:
    """One line per program and one per case that did not pass, for a terminal."""
    lines = []
    for run in result.programs:
        counts = ", ".join(f"{n} {status}" for status, n in sorted(run.counts().items()))
        lines.append(f"{run.status.upper():4} {run.program} on {run.device} ({counts or 'no cases'})")
        for case in run.cases:
            if case.status != "pass" and case.reason != NO_IOMMUFD:
                lines.append(f"       {case.status}: {case.name}: {case.reason}")
        excluded = sum(case.reason == NO_IOMMUFD for case in run.cases)
        if excluded:
            lines.append(f"       skip: {excluded} iommufd variants ({NO_IOMMUFD})")
    if result.qemu_refusals or result.server_refusals:
        lines.append(
            f"DMA_MAP refused: {len(result.qemu_refusals)} by QEMU's account, "
            f"{len(result.server_refusals)} in the server's log"
        )
    if result.error:
        lines.append(f"error: {result.error}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vdev_experiments.kselftest", description=__doc__.splitlines()[0])
    parser.add_argument("--kernel", help="guest kernel set (default: the one the selftests were built from)")
    parser.add_argument("--out", type=Path, default=Path("results"), help="where kselftest.json and kselftest/ go")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds the whole guest run may take")
    parser.add_argument(
        "--only", action="append", default=[], metavar="PROGRAM", help="run only this program (repeatable)"
    )
    args = parser.parse_args(argv)
    try:
        selftests = Selftests.find()
        artefacts = GuestArtefacts.find(args.kernel or selftests.kernel)
    except FileNotFoundError as exc:
        print(f"kselftest: {exc}", file=sys.stderr)
        return 2
    plan = [entry for entry in PLAN if not args.only or entry[0] in args.only]
    if not plan:
        parser.error(f"--only names none of {', '.join(program for program, _ in PLAN)}")
    workdir = args.out / "kselftest"
    workdir.mkdir(parents=True, exist_ok=True)
    print(
        f"kselftest: {selftests.source_package} {selftests.source_version} in {artefacts.package} "
        f"{artefacts.package_version}",
        file=sys.stderr,
        flush=True,
    )
    result = trio.run(lambda: run_kselftests(artefacts, selftests, plan=plan, workdir=workdir, timeout=args.timeout))
    write_report(result, args.out)
    print(summary(result))
    print(f"report: {args.out / 'kselftest.json'}; TAP and console log under {workdir}", file=sys.stderr)
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())
