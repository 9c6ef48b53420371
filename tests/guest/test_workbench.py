"""``vdev guest`` boots a real kernel with devices attached and runs a command, as a user types it.

Each test is one boot (about 5 s under TCG on an idle machine).  The command
line is run as a subprocess, the way a kernel engineer runs it: stdout must
carry only the command's output, the exit status must be the command's (or
the kernel-problem code), and stderr must name what ran.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from pathlib import Path

from vdev.guest import EXIT_KERNEL_PROBLEM, files_from_copy
from vdev.qemu.guest import GuestArtefacts
from vdev.testing import BootGuest, served
from vdev_devices.hello import Hello
from vdev_devices.idio16 import Idio16

TIMEOUT = 300


def vdev_guest_command(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vdev", "guest", *args],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=TIMEOUT,
    )


def console_log(stderr: str) -> Path:
    lines = [line for line in stderr.splitlines() if "console log: " in line]
    assert lines, stderr
    return Path(lines[-1].rpartition("console log: ")[2])


def test_a_served_device_is_on_the_guests_pci_bus(qemu_binary: Path, guest_artefacts: GuestArtefacts) -> None:
    done = vdev_guest_command(
        "--kernel", guest_artefacts.name, "--device", "hello", "--run", "cat /sys/bus/pci/devices/*/vendor"
    )
    assert done.returncode == 0, done.stderr
    assert "0x1b36" in done.stdout.split()
    assert all(line.startswith("0x") for line in done.stdout.split()), done.stdout  # only the command's output
    # What ran, a line per phase, and where the console went.
    assert f"{guest_artefacts.package} {guest_artefacts.package_version}" in done.stderr
    assert "QEMU emulator version" in done.stderr and "libvfio-user " in done.stderr
    for phase in ("attaching hello0", "booting", "the kernel started", "init: modules loaded", "running the command"):
        assert phase in done.stderr, phase
    assert console_log(done.stderr).is_file()


def test_the_exit_status_is_the_commands(qemu_binary: Path, guest_artefacts: GuestArtefacts) -> None:
    done = vdev_guest_command("--kernel", guest_artefacts.name, "--run", "echo leaving; exit 7")
    assert done.returncode == 7, done.stderr
    assert done.stdout == "leaving\n"


def test_a_kernel_given_as_a_directory_boots(
    qemu_binary: Path, guest_artefacts: GuestArtefacts, tmp_path: Path
) -> None:
    """A directory with boot/vmlinuz-<release> and lib/modules/<release>: Debian's package, unpacked."""
    root = guest_artefacts.initrd.parent / "root"
    assert (root / "boot").is_dir(), f"make guest keeps the unpacked packages in {root}"
    kernel = tmp_path / "my-kernel"
    kernel.mkdir()
    for part in ("boot", "lib", "usr"):
        if (root / part).is_dir():
            (kernel / part).symlink_to(root / part)
    done = vdev_guest_command("--kernel", str(kernel), "--device", "hello", "--vfio", "--run", "uname -r")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [guest_artefacts.release]
    assert f"the kernel at {kernel}" in done.stderr and "no Debian package" in done.stderr
    assert "vfio-pci bound 0000:00:03.0" in done.stderr


def test_a_kernel_problem_ends_the_run_with_its_lines_and_its_own_status(
    qemu_binary: Path, guest_artefacts: GuestArtefacts
) -> None:
    done = vdev_guest_command("--kernel", guest_artefacts.name, "--run", "echo c > /proc/sysrq-trigger; sleep 100")
    assert done.returncode == EXIT_KERNEL_PROBLEM, done.stderr
    assert "the guest kernel reported a problem (panic)" in done.stderr
    assert "Kernel panic - not syncing: sysrq triggered crash" in done.stderr
    assert "Kernel panic" in console_log(done.stderr).read_text()


def read_until(process: subprocess.Popen[bytes], marker: bytes, seen: bytearray) -> None:
    """Read the process's stdout into ``seen`` until ``marker`` is in it (bounded by TIMEOUT)."""
    assert process.stdout is not None
    deadline = time.monotonic() + TIMEOUT
    while marker not in seen:
        ready, _, _ = select.select([process.stdout], [], [], max(0.0, deadline - time.monotonic()))
        chunk = os.read(process.stdout.fileno(), 65536) if ready else b""
        assert chunk, f"no {marker!r} on the console; it showed:\n{seen.decode(errors='replace')}"
        seen += chunk


def test_without_a_command_the_console_is_the_guests(qemu_binary: Path, guest_artefacts: GuestArtefacts) -> None:
    command = [sys.executable, "-m", "vdev", "guest", "--kernel", guest_artefacts.name]
    with subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as process:
        assert process.stdin is not None
        seen = bytearray()
        # /init reports init.done, then starts the shell; type once its prompt is there.
        read_until(process, b'"kind":"init.done"', seen)
        read_until(process, b"# ", seen)
        process.stdin.write(b"echo typed-$((6 * 7))\nexit\n")
        process.stdin.flush()
        rest, stderr = process.communicate(timeout=TIMEOUT)
    console = (bytes(seen) + rest).decode(errors="replace")
    assert process.returncode == 0, stderr.decode()
    assert "typed-42" in console
    assert "Linux version" in console  # the whole console, boot included


async def test_the_fixture_attaches_served_and_external_devices_copies_files_and_binds_vfio_pci(
    qemu_binary: Path,
    guest_artefacts: GuestArtefacts,
    tmp_path: Path,
    vdev_socket_dir: Path,
    vdev_guest: BootGuest,
) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "check.sh").write_text(
        "for f in /sys/bus/pci/devices/0000:00:0[34].0; do\n"
        "  echo $(cat $f/vendor) $(basename $(readlink $f/driver))\n"
        "done\n"
    )
    external = vdev_socket_dir / "external.sock"
    # Any vfio-user server listening on a socket; here one this test runs, with a device of another vendor.
    async with served(Idio16(), external):
        outcome = await vdev_guest(
            "sh data/check.sh",
            kernel=guest_artefacts,
            devices=[Hello()],
            sockets=[external],
            vfio=True,
            files=files_from_copy(str(tmp_path / "data")),
        )
    assert outcome.status == 0, outcome.console_log.read_text()
    assert outcome.output.split("\n")[:2] == [
        f"0x{Hello.vendor_id:04x} vfio-pci",
        f"0x{Idio16.vendor_id:04x} vfio-pci",
    ], outcome.output
    assert outcome.kernel_error is None
    assert outcome.provenance.kernel_package == guest_artefacts.package
    assert outcome.console_log.is_relative_to(tmp_path)
