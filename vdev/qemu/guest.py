"""Boot a Linux guest with vdev devices attached and read what it reports.

Where :class:`~vdev.qemu.QemuMachine` plays firmware and driver itself through
qtest, :class:`GuestMachine` boots a real kernel, so the guest's own drivers
(vfio-pci, uio, a device's in-kernel driver) touch the device.  The kernel and
initramfs come from ``make guest`` (``tools/guest.sh``); the initramfs's
``/init`` loads the vfio modules, runs the test's commands and powers off.

The protocol between guest and harness is the serial console: the guest
reports results as lines ::

    VDEV {"kind": "vfio.region", "index": 0, "size": 4096, ...}

anywhere in a console line (a kernel message may precede it), one JSON object
each with a string ``kind``; everything else on the console is the kernel's
and the programs' own output, kept in a log.  ``/init`` itself reports
``init.ready`` (modules loaded), ``run.start``/``run.exit`` around each
command and ``init.done`` before powering off.

Choices that are not obvious:

* TCG, not KVM: ``/dev/kvm`` may exist where guests cannot run under it.  Set
  ``VDEV_GUEST_ACCEL=kvm`` (or pass ``accel``) where KVM works.
* q35 with an emulated Intel IOMMU (``caching-mode=on`` so QEMU sees the
  guest's mappings; ``intremap=on`` with a split irqchip): vfio-pci in the
  guest needs an IOMMU, and Debian's kernels have no vfio no-IOMMU mode.
* Guest RAM is a shared memfd, so a vfio-user server can map it for DMA.
* Commands reach the guest in a small cpio archive appended to the
  initramfs (``/vdev/run``, plus any ``files``): the kernel unpacks
  concatenated archives, and nothing has to fit the 2 KiB command line.
* After ``/init`` has loaded its modules it lowers the console log level to
  ``kernel_loglevel`` (default 5: warnings and worse), so that the kernel's
  info messages do not land in the middle of result lines.  Boot messages
  before that are all on the console.
* QEMU is always stopped when the block ends (SIGTERM, then SIGKILL).  The
  console log stays on disk when the block fails; its tail, the kernel's
  ``BUG:``/``WARNING:``/``Oops`` lines and QEMU's stderr are attached to the
  error.

Example::

    async with served(Hello(), sock) as ctx, GuestMachine(
        devices=[vfio_user_pci(sock, addr="0x3")],
        run=["pci-list"],
    ) as guest:
        device = await guest.expect("pci.device", vendor="1b36")
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import stat
import subprocess
import tempfile
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import ExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import trio

from vdev import deps
from vdev.qemu._once import EnteredOnce
from vdev.qemu.cmdline import MEMORY_BACKEND_ID, DeviceSpec, MiB, device_arg
from vdev.qemu.errors import QemuError, QemuStartError

#: The command that builds the guest artefacts.
GUEST_BUILD_COMMAND = "make guest"
#: The kernel set used when none is named (Debian bookworm's 6.1).
DEFAULT_GUEST = "bookworm"
#: What precedes a result's JSON object on a console line.
RESULT_MARKER = "VDEV "
#: Kernel command-line words every guest gets (the caller's ``append`` follows).  ``no_timer_check``:
#: under TCG on a loaded host the boot-time check that the timer ticks through the interrupt-remapped
#: IO-APIC can miss its window and panic ("timer doesn't work through Interrupt-remapped IO-APIC");
#: the check tests the host's speed, not the guest, so it is skipped, as for any virtual machine.
BASE_APPEND = "console=ttyS0 intel_iommu=on vfio_iommu_type1.allow_unsafe_interrupts=1 panic=-1 no_timer_check"
#: Added unless a run asks otherwise: a warning or an oops panics, so no problem is silently survived
#: (with ``panic=-1`` and QEMU's ``-no-reboot`` the panic ends the machine at once).
PANIC_ON_PROBLEM = "panic_on_warn=1 oops=panic"

#: What the kernel prints when something is wrong, by name.  Each pattern is
#: searched for anywhere in a console line (a timestamp or another message may
#: precede it).  ``BUG:`` covers ``BUG: KFENCE``, soft lockups, bad page state
#: and sleeping in atomic context; the others are reports that do not start
#: with ``BUG:``, each seen in a real kernel's output.
KERNEL_PROBLEM_PATTERNS: Mapping[str, str] = {
    "bug": r"\bBUG:",
    "kernel-bug-at": r"\bkernel BUG at\b",
    "warning": r"\bWARNING:",
    "oops": r"\bOops\b",
    "invalid-opcode": r"\binvalid opcode: [0-9a-f]{4}\b",
    "panic": r"\bKernel panic\b",
    "general-protection": r"\bgeneral protection fault\b",
    "unable-to-handle": r"\bUnable to handle kernel\b",
    "oom-leaked": r"\bVM_FAULT_OOM leaked out to the #PF handler\b",
    "hung-task": r"\bINFO: task \S.* blocked for more than \d+ seconds",
    "rcu-stall": r"\brcu: INFO: \w+ (?:self-)?detected stalls?\b",
    "list-corruption": r"\blist_(?:add|del) corruption\b",
    "ubsan": r"\bUBSAN:",
    "kasan": r"\bKASAN:",
}
#: Any of :data:`KERNEL_PROBLEM_PATTERNS`.
KERNEL_PROBLEM = re.compile("|".join(KERNEL_PROBLEM_PATTERNS.values()))
#: Lines after which a kernel report is complete, so the run can end without waiting out the grace time.
_REPORT_END = re.compile(r"---\[ end (?:trace|Kernel panic)|\bKernel Offset:|\bRebooting in\b")

#: A line of a call trace: ``handle_nested_irq+0x95/0xe0`` (a leading ``?`` marks the unwinder's guess).
_FRAME = re.compile(r"^\s*(?:\[[\s\d.]+\]\s*)?(\?\s+)?([A-Za-z_.$][\w.$]*)\+0x[0-9a-f]+/0x[0-9a-f]+")
#: Where a call trace ends: the task's or the interrupt stack's end, or the report's next section.
_TRACE_END = re.compile(r"</TASK>|Modules linked in:|---\[ end ")
#: The instruction pointer line of a report: ``RIP: 0010:0x0``, ``RIP: 0010:regmap_irq_thread+0x206/0x680``.
_RIP = re.compile(r"\bRIP: (?:[0-9a-f]{4}:)?(\S+)")

_TAIL_LINES = 60
#: Console lines kept before, and at most after, the first kernel problem in its report.
_REPORT_BEFORE = 10
_REPORT_AFTER = 80


# -- artefacts ----------------------------------------------------------------------


def guest_dir() -> Path:
    """Where ``make guest`` puts its artefacts: ``$VDEV_GUEST_DIR`` or ``guest/`` in the deps cache."""
    configured = os.environ.get("VDEV_GUEST_DIR")
    if configured:
        return Path(configured)
    return deps.cache_dir() / "guest"


@dataclass(frozen=True)
class GuestArtefacts:
    """One kernel set built by ``make guest``: kernel, initramfs and what they hold."""

    #: The set's name, e.g. ``bookworm`` or ``trixie``.
    name: str
    #: The kernel to boot: the uncompressed ELF ``vmlinux`` when there is one, else the bzImage.
    kernel: Path
    #: The kernel as Debian ships it.
    bzimage: Path
    #: The initramfs (gzip cpio) with busybox, modules, ``/init`` and the guest programs.
    initrd: Path
    #: The kernel release (``uname -r``).
    release: str
    #: Debian's package the kernel image came from (``linux-image-<release>``); ``None`` for a kernel of
    #: the user's own build (:func:`vdev.guest.find_kernel`).
    package: str | None
    #: That package's version.
    package_version: str | None
    #: The modules ``/init`` loads, in load order.
    modules: tuple[str, ...]
    #: The patch whose rebuilt modules replace the stock ones in :attr:`initrd` (``vdev guest --patch``).
    patch: str | None = None
    #: That patch's SHA-256.
    patch_sha256: str | None = None

    @classmethod
    def find(cls, name: str = DEFAULT_GUEST, directory: Path | None = None) -> GuestArtefacts:
        """The set called ``name``; :class:`FileNotFoundError` naming the command that builds it."""
        where = (directory or guest_dir()) / name
        manifest = where / "kernel.json"
        command = GUEST_BUILD_COMMAND if name == DEFAULT_GUEST else f'{GUEST_BUILD_COMMAND} KERNELS="{name}"'
        if not manifest.exists() or not (where / "initramfs.cpio.gz").exists():
            raise FileNotFoundError(f"guest artefacts {name!r} not found in {where}; run `{command}`")
        info = json.loads(manifest.read_text())
        return cls(
            name=name,
            kernel=where / info["kernel"],
            bzimage=where / "bzImage",
            initrd=where / "initramfs.cpio.gz",
            release=info["release"],
            # Sets built before the manifest named the package: Debian names it after the release.
            package=info.get("package", f"linux-image-{info['release']}"),
            package_version=info["package_version"],
            modules=tuple(info["modules"]),
        )


# -- errors -------------------------------------------------------------------------


class GuestError(QemuError):
    """Base class of the guest harness's errors."""


class GuestTimeoutError(GuestError):
    """The guest did not report what was expected in time (or the machine's time ran out)."""


class GuestExitedError(GuestError):
    """The guest powered off, or QEMU exited, before reporting what was expected."""


class GuestKernelError(GuestError):
    """The guest kernel reported a problem (a line matching :data:`KERNEL_PROBLEM_PATTERNS`)."""

    def __init__(self, message: str, problems: Sequence[str], report: Sequence[str] = ()) -> None:
        super().__init__(message)
        #: The offending console lines.
        self.problems = list(problems)
        #: The console around the first problem: the lines before it and the report that followed.
        self.report = list(report)

    @property
    def kinds(self) -> list[str]:
        """The names (keys of :data:`KERNEL_PROBLEM_PATTERNS`) of every kind of problem seen, in order."""
        return kernel_problem_kinds(self.problems)

    @property
    def call_trace(self) -> list[str]:
        """The functions of the report's first call trace, innermost first (see :func:`kernel_call_trace`)."""
        return kernel_call_trace(self.report)

    @property
    def rip(self) -> str | None:
        """Where the report says the CPU was: ``0x0`` for a call through a NULL pointer (see :func:`kernel_rip`)."""
        return kernel_rip(self.report)


def kernel_problem_kinds(lines: Iterable[str]) -> list[str]:
    """The pattern names matching ``lines``, each once, in the order first seen.

    >>> kernel_problem_kinds(["[ 1.5] kernel BUG at mm/memory.c:2402!", "invalid opcode: 0000 [#1] SMP"])
    ['kernel-bug-at', 'invalid-opcode']
    """
    kinds: list[str] = []
    for line in lines:
        for name, regex in KERNEL_PROBLEM_PATTERNS.items():
            if name not in kinds and re.search(regex, line):
                kinds.append(name)
    return kinds


def kernel_call_trace(lines: Iterable[str]) -> list[str]:
    """The function names of the first ``Call Trace:`` in ``lines``, innermost first.

    Frames the unwinder only guessed (``?``) are left out, so what remains
    is the chain of calls that led to the report; module names and offsets
    are dropped.

    >>> kernel_call_trace(["[ 4.3] Call Trace:", "[ 4.3]  <TASK>", "[ 4.3]  handle_nested_irq+0x95/0xe0",
    ...                    "[ 4.3]  ? __pfx_irq_thread+0x10/0x10", "[ 4.3]  regmap_irq_thread+0x206/0x680 [regmap]",
    ...                    "[ 4.3]  </TASK>", "[ 4.3]  kthread+0xd2/0x100"])
    ['handle_nested_irq', 'regmap_irq_thread']
    """
    functions: list[str] = []
    inside = False
    for line in lines:
        if not inside:
            inside = "Call Trace:" in line
            continue
        if _TRACE_END.search(line):
            break
        frame = _FRAME.match(line)
        if frame is not None and frame[1] is None:
            functions.append(frame[2])
    return functions


def kernel_rip(lines: Iterable[str]) -> str | None:
    """The instruction pointer of the first ``RIP:`` line in ``lines`` (without the code segment), if any.

    >>> kernel_rip(["[ 4.3] Oops: 0010 [#1] SMP NOPTI", "[ 4.3] RIP: 0010:0x0"])
    '0x0'
    """
    for line in lines:
        found = _RIP.search(line)
        if found is not None:
            return found[1]
    return None


# -- results ------------------------------------------------------------------------


@dataclass(frozen=True)
class GuestResult:
    """One ``VDEV {...}`` line from the guest; index it like the JSON object."""

    #: The ``kind`` member.
    kind: str
    #: The whole JSON object (``kind`` included).
    data: Mapping[str, Any]
    #: Seconds since QEMU started when the line arrived.
    at: float
    #: The line's number in the console log (from 1).
    line: int

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    def matches(self, kind: str, fields: Mapping[str, Any]) -> bool:
        """Whether this result has ``kind`` and every member in ``fields`` equal."""
        return self.kind == kind and all(self.data.get(k, _MISSING) == v for k, v in fields.items())


_MISSING = object()


def parse_result(line: str) -> Mapping[str, Any] | None:
    """The JSON object of a console line carrying a result, ``None`` for other lines.

    Raises :class:`ValueError` for a line with the marker but no valid object
    (a kernel message landed inside it, say).

        >>> parse_result('[ 1.2] x VDEV {"kind": "a", "n": 1}')
        {'kind': 'a', 'n': 1}
        >>> parse_result("VDEVICE") is None
        True
    """
    start = line.find(RESULT_MARKER + "{")
    if start < 0:
        return None
    data, _ = json.JSONDecoder().raw_decode(line, start + len(RESULT_MARKER))
    if not isinstance(data, dict) or not isinstance(data.get("kind"), str):
        raise ValueError("a result must be a JSON object with a string 'kind'")
    return data


# -- command line -------------------------------------------------------------------


def guest_command(
    binary: str | os.PathLike[str],
    *,
    kernel: Path,
    initrd: Path,
    append: str,
    memory: int,
    smp: int = 1,
    accel: str = "tcg",
    devices: Sequence[DeviceSpec] = (),
    extra_args: Sequence[str] = (),
) -> list[str]:
    """QEMU's argument vector for a guest whose serial console is QEMU's stdout."""
    if memory <= 0 or memory % MiB:
        raise ValueError(f"memory must be a positive whole number of MiB, not {memory}")
    size = f"{memory // MiB}M"
    args = [
        os.fspath(binary),
        "-machine", f"q35,kernel-irqchip=split,memory-backend={MEMORY_BACKEND_ID}",
        "-accel", accel,
        "-m", size,
        "-object", f"memory-backend-memfd,id={MEMORY_BACKEND_ID},size={size},share=on",
        "-smp", str(smp),
        "-nodefaults",
        "-no-user-config",
        "-display", "none",
        "-monitor", "none",
        "-no-reboot",
        "-chardev", "stdio,id=console,signal=off",
        "-serial", "chardev:console",
        "-device", "intel-iommu,caching-mode=on,intremap=on",
        "-kernel", os.fspath(kernel),
        "-initrd", os.fspath(initrd),
        "-append", append,
    ]  # fmt: skip
    for spec in devices:
        args += ["-device", device_arg(spec)]
    args += extra_args
    return args


def extra_initrd(files: Mapping[str, bytes]) -> bytes:
    """A gzip cpio (newc) archive of ``files`` (guest path -> content), all mode 0755.

    Appended to an initramfs it adds or replaces those files; parent
    directories are created.
    """
    entries: list[bytes] = []
    directories: set[str] = set()
    for number, (path, content) in enumerate(sorted(files.items()), start=1):
        name = path.strip("/")
        parts = name.split("/")[:-1]
        for depth in range(1, len(parts) + 1):
            directory = "/".join(parts[:depth])
            if directory not in directories:
                directories.add(directory)
                entries.append(_newc(directory, stat.S_IFDIR | 0o755, b"", 0))
        entries.append(_newc(name, stat.S_IFREG | 0o755, content, number))
    entries.append(_newc("TRAILER!!!", 0, b"", 0))
    return gzip.compress(b"".join(entries), mtime=0)


def _newc(name: str, mode: int, data: bytes, ino: int) -> bytes:
    fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name) + 1, 0)
    header = b"070701" + b"".join(b"%08X" % f for f in fields) + name.encode() + b"\0"
    header += b"\0" * (-len(header) % 4)
    return header + data + b"\0" * (-len(data) % 4)


# -- the machine --------------------------------------------------------------------


@dataclass
class _ConsoleState:
    """What the reader task has seen so far."""

    results: list[GuestResult] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    malformed: list[str] = field(default_factory=list)
    #: The last lines, so that a problem's report can start with what led to it.
    recent: deque[str] = field(default_factory=lambda: deque(maxlen=_REPORT_BEFORE))
    #: The first problem's line with the lines before it and after it (up to the report's end).
    report: list[str] = field(default_factory=list)
    report_complete: bool = False
    lines: int = 0
    done: bool = False


class GuestMachine(EnteredOnce):
    """A QEMU guest booting a Linux kernel with ``devices`` attached; an async context manager.

    ``kernel`` and ``initrd`` default to the ``bookworm`` set of ``make
    guest`` (:class:`GuestArtefacts`).  ``run`` are shell commands ``/init``
    runs in order, each in its own ``sh -c`` between ``run.start`` and
    ``run.exit`` reports (one line each, in ``/vdev/run``); ``files`` (guest
    path -> bytes or text) are added to the initramfs, executable.  ``append`` is
    added to the kernel command line after :data:`BASE_APPEND` (and
    :data:`PANIC_ON_PROBLEM` while ``panic_on_problem``, the default).
    ``timeout`` bounds the whole block: when it passes, the body is cancelled
    and :class:`GuestTimeoutError` raised.  With ``check_kernel`` (the
    default) the first console line matching :data:`KERNEL_PROBLEM_PATTERNS`
    ends the block: the reader waits up to ``problem_grace`` seconds for the
    rest of the kernel's report (or its end marker), cancels the body and
    raises :class:`GuestKernelError` with the lines around the problem — a
    hung kernel is reported at once instead of at the timeout.  A guest
    program printing those words counts too.  Without ``check_kernel`` the
    problems are only recorded (:attr:`kernel_problems`).  ``kernel_loglevel`` is the console
    log level once modules are loaded (``None``: the kernel's default, all
    messages).  ``accel`` defaults to ``$VDEV_GUEST_ACCEL`` or ``tcg``.
    ``workdir`` keeps the console log (``console.log``), QEMU's stderr
    (``qemu.log``) and the combined initramfs; without it a temporary
    directory is used and removed unless the block fails.  ``on_output``
    sees every chunk of console output as it arrives, before it is cut into
    lines (a shell prompt has no newline).  ``console_input`` is a file
    descriptor QEMU reads as the serial console's input (a terminal, for a
    person at the console); by default the console has none.
    """

    def __init__(
        self,
        *,
        kernel: str | os.PathLike[str] | None = None,
        initrd: str | os.PathLike[str] | None = None,
        devices: Sequence[DeviceSpec] = (),
        append: str = "",
        run: Sequence[str] = (),
        files: Mapping[str, bytes | str] | None = None,
        memory: int = 256 * MiB,
        smp: int = 1,
        timeout: float = 60.0,
        accel: str | None = None,
        binary: str | os.PathLike[str] | None = None,
        extra_args: Sequence[str] = (),
        workdir: str | os.PathLike[str] | None = None,
        check_kernel: bool = True,
        panic_on_problem: bool = True,
        problem_grace: float = 3.0,
        kernel_loglevel: int | None = 5,
        stop_timeout: float = 2.0,
        on_output: Callable[[bytes], None] | None = None,
        console_input: int | None = None,
    ) -> None:
        if kernel is None or initrd is None:
            artefacts = GuestArtefacts.find()
            kernel = kernel if kernel is not None else artefacts.kernel
            initrd = initrd if initrd is not None else artefacts.initrd
        self._kernel = Path(kernel)
        self._initrd = Path(initrd)
        self._devices = list(devices)
        words = [BASE_APPEND]
        if panic_on_problem:
            words.append(PANIC_ON_PROBLEM)
        if kernel_loglevel is not None:
            words.append(f"vdev.loglevel={kernel_loglevel}")
        if append:
            words.append(append)
        #: The kernel command line.
        self.append = " ".join(words)
        self._files: dict[str, bytes] = {
            path: content.encode() if isinstance(content, str) else bytes(content)
            for path, content in (files or {}).items()
        }
        if any("\n" in command for command in run):
            raise ValueError("a run command is one line; pass scripts as files")
        if run:
            self._files["/vdev/run"] = "".join(f"{command}\n" for command in run).encode()
        self._memory = memory
        self._smp = smp
        self._timeout = timeout
        self._accel = accel or os.environ.get("VDEV_GUEST_ACCEL", "tcg")
        self._binary = binary if binary is not None else deps.qemu_path()
        self._extra_args = list(extra_args)
        self._workdir_given = Path(workdir) if workdir is not None else None
        self._check_kernel = check_kernel
        self._problem_grace = problem_grace
        self._stopped_by_problem = False
        self._stop_timeout = stop_timeout
        self._on_output = on_output
        self._console_input = console_input
        #: QEMU's full argument vector, once started.
        self.command: list[str] = []
        #: The working directory (console log, QEMU's stderr, the combined initramfs).
        self.workdir: Path | None = None
        self._console = _ConsoleState()
        self._changed = trio.Event()
        self._cursor = 0
        self._waiting_for: str | None = None
        self._started_at = 0.0
        self._deadline = float("inf")
        self._process: trio.Process | None = None

    # -- the context manager ----------------------------------------------------

    def _prepare(self, logs: ExitStack) -> tuple[BinaryIO, BinaryIO]:
        """Make the working directory, the initramfs and the command; open the logs."""
        workdir = self._workdir_given
        if workdir is None:
            workdir = Path(tempfile.mkdtemp(prefix="vdev-guest-"))
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        initrd = self._initrd
        if self._files:
            initrd = workdir / "initrd.img"
            initrd.write_bytes(self._initrd.read_bytes() + extra_initrd(self._files))
        self.command = guest_command(
            self._binary,
            kernel=self._kernel,
            initrd=initrd,
            append=self.append,
            memory=self._memory,
            smp=self._smp,
            accel=self._accel,
            devices=self._devices,
            extra_args=self._extra_args,
        )
        return logs.enter_context(open(self.qemu_log, "wb")), logs.enter_context(open(self.console_log, "wb"))

    @asynccontextmanager
    async def _lifetime(self) -> AsyncIterator[None]:
        failure: BaseException | None = None
        with ExitStack() as logs:
            stderr, console = self._prepare(logs)
            try:
                process = await trio.lowlevel.open_process(
                    self.command,
                    stdin=subprocess.DEVNULL if self._console_input is None else self._console_input,
                    stdout=subprocess.PIPE,
                    stderr=stderr,
                )
            except OSError as exc:
                raise QemuStartError(f"cannot run QEMU {self.command[0]}: {exc}") from exc
            self._process = process
            self._started_at = trio.current_time()
            self._deadline = self._started_at + self._timeout
            body = trio.CancelScope(deadline=self._deadline)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read_console, process, console)
                if self._check_kernel:
                    nursery.start_soon(self._end_at_kernel_problem, body)
                try:
                    with body:
                        yield
                    if body.cancelled_caught and not self._stopped_by_problem:
                        waiting = f" while waiting for {self._waiting_for}" if self._waiting_for else ""
                        failure = GuestTimeoutError(
                            f"the guest machine ran out of its {self._timeout} s{waiting}" + self._recent_results()
                        )
                except BaseException as exc:  # re-raised below, outside the nursery
                    failure = exc
                finally:
                    with trio.CancelScope(shield=True):
                        await self._stop(process)
                    nursery.cancel_scope.cancel()
        error = self._outcome(failure)
        if error is None and self._workdir_given is None and self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
        if error is not None:
            raise error

    async def _end_at_kernel_problem(self, body: trio.CancelScope) -> None:
        """Cancel the body once the first kernel problem's report is complete (or ``problem_grace`` passed)."""
        console = self._console
        while not console.problems:
            changed = self._changed
            if console.done:
                return
            await changed.wait()
        with trio.move_on_after(self._problem_grace):
            while not (console.report_complete or console.done):
                changed = self._changed
                await changed.wait()
        self._stopped_by_problem = True
        body.cancel()

    def kernel_error(self) -> GuestKernelError | None:
        """The :class:`GuestKernelError` for what the console showed so far, ``None`` while it is clean."""
        console = self._console
        if not console.problems:
            return None
        kinds = ", ".join(kernel_problem_kinds(console.problems))
        return GuestKernelError(
            f"the guest kernel reported a problem ({kinds}): {console.problems[0].strip()}\n"
            + "\n".join(console.report),
            console.problems,
            console.report,
        )

    async def _stop(self, process: trio.Process) -> None:
        if process.poll() is None:
            process.terminate()
            with trio.move_on_after(self._stop_timeout):
                await process.wait()
        if process.poll() is None:
            process.kill()
            await process.wait()
        # Let the reader take what QEMU wrote last.
        with trio.move_on_after(self._stop_timeout):
            while not self._console.done:
                await self._changed.wait()

    def _outcome(self, failure: BaseException | None) -> BaseException | None:
        kernel = self.kernel_error() if self._check_kernel else None
        if isinstance(failure, trio.Cancelled):
            return failure
        if kernel is not None and (failure is None or isinstance(failure, GuestError)):
            # The kernel's problem is the cause; the guest exiting (a panic) or going quiet follows from it.
            kernel.__cause__ = failure
            failure = kernel
        if failure is None:
            return None
        if self._console.problems and not isinstance(failure, GuestKernelError):
            failure.add_note("guest kernel problems:\n" + "\n".join(self._console.problems))
        failure.add_note(f"guest console (last lines):\n{self.console_tail(_TAIL_LINES)}")
        stderr = self.qemu_stderr()
        if stderr:
            failure.add_note(f"QEMU stderr:\n{stderr}")
        failure.add_note(f"full console log kept: {self.console_log}")
        return failure

    async def _read_console(self, process: trio.Process, log: BinaryIO) -> None:
        assert process.stdout is not None
        pending = b""
        while True:
            chunk = await process.stdout.receive_some(65536)
            if not chunk:
                break
            log.write(chunk)
            log.flush()
            if self._on_output is not None:
                self._on_output(bytes(chunk))
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                self._take_line(line)
            self._notify()
        if pending:
            self._take_line(pending)
        self._console.done = True
        self._notify()

    def _take_line(self, raw: bytes) -> None:
        console = self._console
        console.lines += 1
        line = raw.decode(errors="replace").rstrip("\r")
        if console.problems and not console.report_complete:
            console.report.append(line)
            console.report_complete = bool(_REPORT_END.search(line)) or len(console.report) >= _REPORT_AFTER
        if KERNEL_PROBLEM.search(line):
            if not console.problems:
                console.report = [*console.recent, line]
            console.problems.append(line)
        console.recent.append(line)
        try:
            data = parse_result(line)
        except ValueError:
            console.malformed.append(line)
            return
        if data is not None:
            at = trio.current_time() - self._started_at
            console.results.append(GuestResult(data["kind"], data, at, console.lines))

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    # -- what the guest said --------------------------------------------------------

    @property
    def console_log(self) -> Path:
        """The file holding everything the guest wrote on its console."""
        if self.workdir is None:
            raise RuntimeError("the machine has not started")
        return self.workdir / "console.log"

    @property
    def qemu_log(self) -> Path:
        """The file holding QEMU's stderr."""
        if self.workdir is None:
            raise RuntimeError("the machine has not started")
        return self.workdir / "qemu.log"

    @property
    def results(self) -> list[GuestResult]:
        """Every result so far, in arrival order."""
        return list(self._console.results)

    @property
    def kernel_problems(self) -> list[str]:
        """Console lines matching one of :data:`KERNEL_PROBLEM_PATTERNS`."""
        return list(self._console.problems)

    @property
    def kernel_report(self) -> list[str]:
        """The console around the first kernel problem (empty while there is none)."""
        return list(self._console.report)

    @property
    def malformed_results(self) -> list[str]:
        """Console lines with the result marker but no readable object."""
        return list(self._console.malformed)

    @property
    def finished(self) -> bool:
        """Whether the console has closed (the guest powered off or QEMU exited)."""
        return self._console.done

    @property
    def boot_seconds(self) -> float | None:
        """Seconds from QEMU's start to ``/init``'s ``init.ready``, once it came."""
        for result in self._console.results:
            if result.kind == "init.ready":
                return result.at
        return None

    @property
    def returncode(self) -> int | None:
        """QEMU's exit status, or ``None`` while it runs."""
        return self._process.poll() if self._process is not None else None

    def console_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the console log."""
        try:
            data = self.console_log.read_bytes()
        except (OSError, RuntimeError):
            return ""
        return "\n".join(data.decode(errors="replace").replace("\r", "").splitlines()[-lines:])

    def qemu_stderr(self, lines: int = 20) -> str:
        """The last ``lines`` lines QEMU wrote to stderr."""
        try:
            data = self.qemu_log.read_bytes()
        except (OSError, RuntimeError):
            return ""
        return "\n".join(data.decode(errors="replace").splitlines()[-lines:])

    # A timeout argument rather than the caller's own cancel scope: the
    # default is the machine's remaining time, and the error says what the
    # guest reported instead.
    async def expect(self, kind: str, *, timeout: float | None = None, **fields: Any) -> GuestResult:  # noqa: ASYNC109
        """The next result of ``kind`` whose members equal ``fields``.

        Like pexpect, the search starts after the previous match and results
        passed over are skipped for later calls (they stay in
        :attr:`results`).  ``timeout`` defaults to the machine's remaining
        time.  Raises :class:`GuestTimeoutError`, or :class:`GuestExitedError`
        once the guest can say nothing more.
        """
        started = trio.current_time()
        deadline = self._deadline if timeout is None else min(self._deadline, started + timeout)
        wanted = kind + "".join(f" {k}={v!r}" for k, v in fields.items())
        self._waiting_for = wanted
        with trio.move_on_at(deadline):
            while True:
                changed = self._changed
                results = self._console.results
                for index in range(self._cursor, len(results)):
                    if results[index].matches(kind, fields):
                        self._cursor = index + 1
                        self._waiting_for = None
                        return results[index]
                if self._console.done:
                    await self._reap()
                    raise GuestExitedError(
                        f"the guest finished (QEMU status {self.returncode}) without reporting {wanted}"
                        + self._recent_results()
                    )
                await changed.wait()
        raise GuestTimeoutError(
            f"the guest did not report {wanted} within {trio.current_time() - started:.1f} s" + self._recent_results()
        )

    async def _reap(self) -> None:
        """Give a QEMU whose console has closed a moment to exit, so its status is known."""
        if self._process is not None:
            with trio.move_on_after(self._stop_timeout):
                await self._process.wait()

    def _recent_results(self) -> str:
        skipped = self._console.results[self._cursor :][-10:]
        if not skipped:
            return "; no unmatched results"
        return "; unmatched results since the last match:\n" + "\n".join(
            f"  {json.dumps(dict(r.data))}" for r in skipped
        )

    async def __aiter__(self) -> AsyncIterator[GuestResult]:
        """Every result from the last match on, as it arrives, until the guest finishes."""
        while True:
            changed = self._changed
            while self._cursor < len(self._console.results):
                self._cursor += 1
                yield self._console.results[self._cursor - 1]
            if self._console.done:
                return
            await changed.wait()

    async def wait_exit(self, timeout: float | None = None) -> int:  # noqa: ASYNC109 - as expect()
        """Wait for the guest to power off; returns QEMU's exit status."""
        deadline = self._deadline if timeout is None else min(self._deadline, trio.current_time() + timeout)
        assert self._process is not None
        with trio.move_on_at(deadline):
            await self._process.wait()
            while not self._console.done:
                await self._changed.wait()
            returncode = self._process.returncode
            assert returncode is not None
            return returncode
        raise GuestTimeoutError("the guest did not power off in time")
