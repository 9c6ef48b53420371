"""One ``vdev guest`` run: a kernel, devices attached, a command (or a person) in the guest, an outcome.

:func:`run_guest` does what the command does, for Python callers and the
``vdev_guest`` fixture:

1. the kernel (:func:`~vdev.guest.find_kernel`), with the modules a patch
   touches rebuilt and put in its initramfs (:func:`~vdev.guest.patched`);
2. devices served in-process on sockets of their own, and external
   vfio-user servers by socket path, each attached as ``vfio-user-pci`` at
   its own slot on the root bus (``00:03.0``, ``00:04.0``, … in that order);
3. a guest booted with them (:class:`~vdev.qemu.guest.GuestMachine`):
   ``/init`` loads the modules, binds the devices to vfio-pci when asked
   (``vfio-bind``), runs the command (in ``/root``, under ``/bin/sh``, from
   a script so that it may span lines) or a shell on the console, and
   powers off;
4. a :class:`GuestOutcome`: the command's exit status and output, the
   console log, and the kernel's report when it complained.

The command's output reaches ``on_output`` as it comes: the console lines
between the command's start and exit reports, kernel messages among them.
In ``interactive`` mode every byte of the console goes there instead, as it
arrives, and ``console_input`` (a terminal) is the console's input.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path

import trio

from vdev.guest.errors import GuestSetupError
from vdev.guest.kernels import find_kernel
from vdev.guest.modules import patched
from vdev.model.device import Device
from vdev.provenance import Provenance, collect
from vdev.qemu.cmdline import MiB
from vdev.qemu.guest import (
    DEFAULT_GUEST,
    GuestArtefacts,
    GuestError,
    GuestKernelError,
    GuestMachine,
    GuestResult,
    GuestTimeoutError,
    parse_result,
)
from vdev.testing.serving import served, vfio_user_pci

#: ``vdev guest``'s exit status when the guest kernel reported a problem.
EXIT_KERNEL_PROBLEM = 100
#: ... when the guest ran out of time (as ``timeout(1)``).
EXIT_TIMEOUT = 124
#: ... when the guest could not be run or ended before the command did.
EXIT_FAILED = 1

#: Where the command runs, and where ``--copy`` puts files by default.
GUEST_HOME = "/root"
#: The script holding the command, in the guest.
COMMAND_SCRIPT = "/vdev/command"
#: The first root-bus slot given to an attached device.
FIRST_SLOT = 3

Progress = Callable[[str], None]
Output = Callable[[bytes], None]


@dataclass
class GuestOutcome:
    """What a guest run came to."""

    #: The kernel that ran (with the patch's modules, if any).
    artefacts: GuestArtefacts
    #: The components that ran.
    provenance: Provenance
    #: The console log (kept), with QEMU's stderr (``qemu.log``) and the device servers' log
    #: (``server.log``) next to it.
    console_log: Path
    #: The command's exit status; ``None`` without a command or when it never finished.
    status: int | None = None
    #: What the command printed (with any kernel messages that came meanwhile).
    output: str = ""
    #: The kernel's problem, when it reported one (the run ended there).
    kernel_error: GuestKernelError | None = None
    #: Any other reason the run ended early (a timeout, QEMU failing).
    error: GuestError | None = None
    #: Every ``VDEV`` result the guest reported.
    results: list[GuestResult] = field(default_factory=list)
    #: Seconds from QEMU's start to ``/init``'s modules loaded.
    boot_seconds: float | None = None

    @property
    def exit_status(self) -> int:
        """``vdev guest``'s exit status: the command's, or one of the ``EXIT_*`` codes."""
        if self.kernel_error is not None:
            return EXIT_KERNEL_PROBLEM
        if isinstance(self.error, GuestTimeoutError):
            return EXIT_TIMEOUT
        if self.error is not None:
            return EXIT_FAILED
        if self.status is not None:
            return self.status
        ran_command = any(result.kind == "run.start" and result.get("cmd") == COMMAND_SCRIPT for result in self.results)
        return EXIT_FAILED if ran_command else 0


def files_from_copy(spec: str) -> dict[str, Path]:
    """Guest path -> host file for ``--copy HOST[:GUEST]``; a directory is copied with everything under it.

    Without ``:GUEST`` the copy lands in :data:`GUEST_HOME` under the same
    name.  A ``GUEST`` path is absolute.
    """
    host_text, sep, guest = spec.rpartition(":")
    if not sep or not guest.startswith("/"):
        host_text, guest = spec, ""
    host = Path(host_text)
    if not host.exists():
        raise GuestSetupError(f"--copy {spec}: no such file or directory {host}")
    target = guest.rstrip("/") or f"{GUEST_HOME}/{host.resolve().name}"
    if host.is_file():
        return {target: host}
    return {f"{target}/{path.relative_to(host).as_posix()}": path for path in sorted(host.rglob("*")) if path.is_file()}


def command_script(command: str) -> str:
    """The script ``/init`` runs for ``command``: in :data:`GUEST_HOME`, under ``/bin/sh``."""
    return f"#!/bin/sh\ncd {GUEST_HOME}\n{command}\n"


async def run_guest(
    kernel: str | os.PathLike[str] | GuestArtefacts = DEFAULT_GUEST,
    *,
    command: str | None = None,
    devices: Sequence[Device] = (),
    sockets: Sequence[str | os.PathLike[str]] = (),
    vfio: bool = False,
    patch: str | os.PathLike[str] | None = None,
    files: Mapping[str, bytes | str | os.PathLike[str]] | None = None,
    interactive: bool = False,
    console_input: int | None = None,
    memory_mib: int = 256,
    smp: int = 1,
    timeout: float | None = 600.0,  # noqa: ASYNC109 - bounds QEMU's life, as GuestMachine's own
    append: str = "",
    workdir: str | os.PathLike[str] | None = None,
    binary: str | os.PathLike[str] | None = None,
    panic_on_problem: bool = True,
    on_output: Output | None = None,
    progress: Progress | None = None,
) -> GuestOutcome:
    """Boot ``kernel`` with ``devices`` (served here) and ``sockets`` (external servers) attached; run ``command``.

    ``kernel`` is a set name, a path to a kernel of one's own, or
    :class:`~vdev.qemu.guest.GuestArtefacts`.  ``vfio`` binds every
    attached device to vfio-pci before the command runs; ``patch`` rebuilds
    the modules it touches (a Debian set only).  ``files`` (guest path ->
    content or host path) are put into the guest.  Without a command the
    guest boots and powers off, or, ``interactive``, gives a shell on the
    console.  ``timeout`` (seconds, ``None``: none) bounds the guest's life.
    Raises :class:`~vdev.guest.GuestSetupError` when the guest cannot be
    prepared; everything that happens once it boots is in the outcome.
    """
    say = progress or (lambda line: None)
    plan = await trio.to_thread.run_sync(
        lambda: _prepare(kernel, command, len(devices), sockets, vfio, patch, files or {}, binary, workdir, say)
    )
    words = [append] if append else []
    if interactive:
        words.append("vdev.shell=1")
    directory = plan.workdir
    accel = os.environ.get("VDEV_GUEST_ACCEL", "tcg")
    console = _ConsoleWatcher(on_output, say, raw=interactive)
    socket_dir = Path(tempfile.mkdtemp(prefix="vdev-g-"))  # short: UNIX socket paths are limited to 107 bytes
    own_sockets = [socket_dir / f"{index}-{device.name}.sock" for index, device in enumerate(devices)]
    machine = GuestMachine(
        kernel=plan.artefacts.kernel,
        initrd=plan.artefacts.initrd,
        devices=[
            vfio_user_pci(path, addr=f"0x{FIRST_SLOT + index:x}")
            for index, path in enumerate([*own_sockets, *plan.sockets])
        ],
        run=plan.run,
        files=plan.files,
        append=" ".join(words),
        memory=memory_mib * MiB,
        smp=smp,
        timeout=float("inf") if timeout is None else timeout,
        accel=accel,
        binary=binary,
        workdir=directory,
        panic_on_problem=panic_on_problem,
        on_output=console.feed,
        console_input=console_input,
    )
    outcome = GuestOutcome(artefacts=plan.artefacts, provenance=plan.provenance, console_log=directory / "console.log")
    for address, device in zip(plan.addresses, devices):
        identity = f"{type(device).__name__} {device.vendor_id:04x}:{device.device_id:04x}"
        say(f"attaching {device.name} ({identity}), served here, at {address}")
    for address, path in zip(plan.addresses[len(devices) :], plan.sockets):
        say(f"attaching the vfio-user server at {path} at {address}")
    say(f"booting ({accel.upper()}, {smp} vCPU, {memory_mib} MiB); console log: {outcome.console_log}")
    # The device servers' log (libvfio-user's complaints while QEMU tears down, say) goes next to the
    # console log, not between the command's output lines.
    server_log = logging.FileHandler(directory / "server.log", mode="w")
    vdev_log = logging.getLogger("vdev")
    propagates = vdev_log.propagate
    vdev_log.addHandler(server_log)
    vdev_log.propagate = False
    try:
        async with AsyncExitStack() as stack:
            for device, path in zip(devices, own_sockets):
                await stack.enter_async_context(served(device, path))
            vm = await stack.enter_async_context(machine)
            async for result in vm:
                _report(result, say)
                if result.kind == "run.exit" and result.get("cmd") == COMMAND_SCRIPT:
                    outcome.status = int(result["status"])
            await vm.wait_exit()
    except BaseException as exc:
        error = _guest_error(exc)
        if error is None:
            raise
        if isinstance(error, GuestKernelError):
            outcome.kernel_error = error
        else:
            outcome.error = error
    finally:
        vdev_log.removeHandler(server_log)
        vdev_log.propagate = propagates
        server_log.close()
        _clean_up(socket_dir, directory)
    outcome.output = console.text
    outcome.results = machine.results
    outcome.boot_seconds = machine.boot_seconds
    return outcome


@dataclass
class _Plan:
    """What the guest is booted with, prepared before it starts."""

    artefacts: GuestArtefacts
    provenance: Provenance
    sockets: list[Path]
    addresses: list[str]
    files: dict[str, bytes | str]
    run: list[str]
    #: Where the logs go (made).
    workdir: Path


def _prepare(
    kernel: str | os.PathLike[str] | GuestArtefacts,
    command: str | None,
    own_devices: int,
    sockets: Sequence[str | os.PathLike[str]],
    vfio: bool,
    patch: str | os.PathLike[str] | None,
    files: Mapping[str, bytes | str | os.PathLike[str]],
    binary: str | os.PathLike[str] | None,
    workdir: str | os.PathLike[str] | None,
    say: Progress,
) -> _Plan:
    """The kernel (patched), the components, the files and ``/init``'s commands: the blocking part of a run."""
    external = [Path(path) for path in sockets]
    for path in external:
        if not path.exists() or not stat.S_ISSOCK(path.stat().st_mode):
            raise GuestSetupError(f"--socket {path}: no vfio-user server socket there")
    if isinstance(kernel, GuestArtefacts):
        artefacts = kernel
    else:
        artefacts = find_kernel(kernel, require=("vfio_pci",) if vfio else (), progress=say)
    if patch is not None:
        artefacts = patched(artefacts, patch, progress=say)
    provenance = collect(artefacts, qemu=Path(binary) if binary is not None else None)
    say(describe(provenance))
    guest_files: dict[str, bytes | str] = {
        guest_path: Path(content).read_bytes() if isinstance(content, os.PathLike) else content
        for guest_path, content in files.items()
    }
    addresses = [f"0000:00:{slot:02x}.0" for slot in range(FIRST_SLOT, FIRST_SLOT + own_devices + len(external))]
    run = []
    if vfio and addresses:
        run.append("vfio-bind " + " ".join(addresses))
    if command is not None:
        guest_files[COMMAND_SCRIPT] = command_script(command)
        run.append(COMMAND_SCRIPT)
    directory = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="vdev-guest-"))
    directory.mkdir(parents=True, exist_ok=True)
    return _Plan(artefacts, provenance, external, addresses, guest_files, run, directory)


def _clean_up(socket_dir: Path, workdir: Path) -> None:
    """Remove the sockets' directory and the combined initramfs; the logs stay."""
    shutil.rmtree(socket_dir, ignore_errors=True)
    (workdir / "initrd.img").unlink(missing_ok=True)


def describe(provenance: Provenance) -> str:
    """One line naming the kernel, QEMU and libvfio-user a run uses."""
    p = provenance
    if p.kernel_package is not None:
        kernel = f"{p.kernel_package} {p.kernel_package_version} ({p.kernel_release})"
    else:
        kernel = f"the kernel at {p.kernel_name} ({p.kernel_release}, no Debian package)"
    if p.kernel_patch is not None:
        kernel += f" with modules rebuilt by {p.kernel_patch} (sha256 {(p.kernel_patch_sha256 or '')[:12]})"
    qemu = p.qemu_version or "QEMU (version unknown)"
    if p.qemu_package_version and p.qemu_package_version not in qemu:
        qemu += f" (Debian {p.qemu_package_version})"
    libvfio_user = (p.libvfio_user_revision or "unknown")[:12]
    return f"kernel {kernel}; {qemu}; libvfio-user {libvfio_user}; vdev {p.vdev_commit or p.vdev_version}"


def _report(result: GuestResult, say: Progress) -> None:
    """A progress line for the results that mark a phase of the run."""
    at = f"{result.at:5.1f} s"
    if result.kind == "init.ready":
        say(f"{at} init: modules loaded ({', '.join(result.get('modules', [])) or 'none'}), kernel {result['kernel']}")
    elif result.kind == "init.module":
        say(f"{at} init: module {result['name']} did not load (insmod status {result['status']})")
    elif result.kind == "vfio.bound":
        say(f"{at} vfio-pci bound {result['addr']} (IOMMU group {result['iommu_group']})")
    elif result.kind == "vfio.bind-error":
        say(f"{at} vfio-pci did not bind {result['addr']}: {result['message']}")
    elif result.kind == "run.start" and result.get("cmd") == COMMAND_SCRIPT:
        say(f"{at} running the command")
    elif result.kind == "run.exit" and result.get("cmd") == COMMAND_SCRIPT:
        say(f"{at} the command exited with status {result['status']}")
    elif result.kind == "init.done":
        say(f"{at} powering off")


#: Kernel console lines that mark a phase of the boot, and what to say about them.
_BOOT_MILESTONES = {
    "Linux version ": "the kernel started",
    "Run /init as init process": "the kernel booted; /init starts",
}


class _ConsoleWatcher:
    """Watches the console: boot milestones, and the command's output picked out (or everything, ``raw``)."""

    def __init__(self, sink: Output | None, say: Progress, *, raw: bool) -> None:
        self._sink = sink
        self._say = say
        self._raw = raw
        self._pending = b""
        self._inside = False
        self._kept: list[bytes] = []
        self._started = trio.current_time()
        self._milestones = dict(_BOOT_MILESTONES)

    @property
    def text(self) -> str:
        return b"".join(self._kept).decode(errors="replace")

    def feed(self, chunk: bytes) -> None:
        if self._raw:
            self._emit(chunk)
        *lines, self._pending = (self._pending + chunk).split(b"\n")
        for raw in lines:
            self._line(raw.rstrip(b"\r"))

    def _line(self, raw: bytes) -> None:
        text = raw.decode(errors="replace")
        for marker, phase in list(self._milestones.items()):
            if marker in text:
                del self._milestones[marker]
                at = trio.current_time() - self._started
                self._say(f"{at:5.1f} s {phase}: {text[text.index(marker) :][:90]}")
        if self._raw:
            return
        try:
            result = parse_result(text)
        except ValueError:
            result = None
        mine = result is not None and result.get("cmd") == COMMAND_SCRIPT
        if mine and result is not None and result["kind"] == "run.start":
            self._inside = True
        elif mine and result is not None and result["kind"] == "run.exit":
            # Output without a final newline shares its line with the exit report.
            before = raw[: raw.find(b"VDEV {")]
            if self._inside and before:
                self._emit(before + b"\n")
            self._inside = False
        elif self._inside:
            self._emit(raw + b"\n")

    def _emit(self, data: bytes) -> None:
        self._kept.append(data)
        if self._sink is not None:
            self._sink(data)


def _guest_error(exc: BaseException) -> GuestError | None:
    """The guest harness's error in ``exc``, looking inside exception groups (nurseries wrap it)."""
    if isinstance(exc, GuestError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _guest_error(inner)
            if found is not None:
                return found
    return None
