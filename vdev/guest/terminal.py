"""``vdev guest`` on a terminal: progress on stderr, the command's output on stdout, or the console itself.

Progress goes to stderr, one line per phase, so that stdout carries only
what the command printed (``vdev guest --run 'cat x' > x`` works).  Without
a command the terminal becomes the guest's serial console: QEMU reads it
(raw; Ctrl-C goes to the guest) and every byte the guest writes is shown as
it comes; exiting the shell powers the guest off.  The terminal's settings
are restored however the run ends.
"""

from __future__ import annotations

import functools
import os
import sys
import termios
from collections.abc import Callable, Sequence
from pathlib import Path

import trio

from vdev.guest.session import GuestOutcome, files_from_copy, run_guest
from vdev.model.device import Device

_PREFIX = "vdev guest:"


def run_on_terminal(
    *,
    kernel: str,
    command: str | None,
    devices: Sequence[Device],
    sockets: Sequence[Path],
    vfio: bool,
    patch: Path | None,
    copies: Sequence[str],
    memory_mib: int,
    smp: int,
    timeout: float | None,
    append: str,
    workdir: Path | None,
) -> int:
    """Run the guest as ``vdev guest`` does; returns the exit status (the command's, or an ``EXIT_*`` code).

    Raises :class:`~vdev.guest.GuestSetupError` when the guest cannot be prepared.
    """
    interactive = command is None
    files: dict[str, str | bytes | os.PathLike[str]] = {}
    for spec in copies:
        files.update(files_from_copy(spec))
    console_started = False

    def say(line: str) -> None:
        if not (interactive and console_started):
            print(f"{_PREFIX} {line}", file=sys.stderr, flush=True)

    def show(data: bytes) -> None:
        nonlocal console_started
        console_started = True
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()

    terminal = interactive and sys.stdin.isatty()
    saved = termios.tcgetattr(sys.stdin.fileno()) if terminal else None
    run = functools.partial(
        run_guest,
        kernel,
        command=command,
        devices=devices,
        sockets=sockets,
        vfio=vfio,
        patch=patch,
        files=files,
        interactive=interactive,
        console_input=sys.stdin.fileno() if interactive else None,
        memory_mib=memory_mib,
        smp=smp,
        timeout=timeout,
        append=append,
        workdir=workdir,
        on_output=show,
        progress=say,
    )
    try:
        outcome = trio.run(run)
    finally:
        if saved is not None:
            termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN, saved)
    console_started = False
    _summarise(outcome, say)
    return outcome.exit_status


def _summarise(outcome: GuestOutcome, say: Callable[[str], None]) -> None:
    """How the run ended: the kernel's report, the error, the command's status; the console log."""
    if outcome.kernel_error is not None:
        error = outcome.kernel_error
        say(f"the guest kernel reported a problem ({', '.join(error.kinds)}); its console lines:")
        for line in error.report:
            print(f"  | {line}", file=sys.stderr)
        say(f"exit status {outcome.exit_status} (a kernel problem)")
    elif outcome.error is not None:
        say(f"{str(outcome.error).splitlines()[0]}; exit status {outcome.exit_status}")
    elif outcome.status is not None:
        say(f"exit status {outcome.status} (the command's)")
    say(f"console log: {outcome.console_log}")
