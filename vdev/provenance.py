"""What ran: the exact components behind a result, recorded with it.

A result about a kernel, QEMU or libvfio-user is worth only as much as the
record of which builds produced it.  ``uname -r`` does not name a Debian
package version (6.1.0-50-amd64 has been several), so a report carries the
package name and version the guest kernel came from, QEMU's package version
and its own ``--version``, the libvfio-user revision and the patch set
applied to it, the vdev commit, and the patch whose rebuilt modules the
guest loaded in place of the stock ones.
Every field is read from what was provisioned, never assumed; what cannot be
read is recorded as ``None`` rather than guessed.
"""

from __future__ import annotations

import subprocess
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vdev import deps

if TYPE_CHECKING:
    from vdev.qemu.guest import GuestArtefacts


@dataclass(frozen=True)
class Provenance:
    """The components of one run, as JSON-ready strings (``None``: could not be determined)."""

    vdev_commit: str | None
    vdev_version: str | None
    qemu_package_version: str | None
    qemu_version: str | None
    libvfio_user_revision: str | None
    kernel_name: str | None = None
    kernel_package: str | None = None
    kernel_package_version: str | None = None
    kernel_release: str | None = None
    #: The patch set ``make deps`` applied to libvfio-user (``None``: none recorded, e.g. an unpatched build).
    libvfio_user_patch_set: str | None = None
    #: The patch whose rebuilt modules replaced the stock ones, and its SHA-256.
    kernel_patch: str | None = None
    kernel_patch_sha256: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def _first_line(command: list[str], cwd: Path | None = None) -> str | None:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False, cwd=cwd)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = done.stdout.splitlines()
    return lines[0].strip() if done.returncode == 0 and lines else None


def vdev_commit() -> str | None:
    """The checkout's commit, with ``-dirty`` when it has uncommitted changes; ``None`` outside a checkout."""
    checkout = Path(__file__).resolve().parent.parent
    if not (checkout / ".git").exists():
        return None
    return _first_line(["git", "describe", "--always", "--dirty", "--abbrev=12"], cwd=checkout)


def qemu_package_version() -> str | None:
    """The Debian package version ``make deps`` unpacked (``None`` for a QEMU given by ``$VDEV_QEMU``)."""
    if deps.qemu_path() != deps.cache_dir() / "bin" / "qemu-system-x86_64":
        return None
    return _read(deps.cache_dir() / "qemu.version")


def libvfio_user_patch_set() -> str | None:
    """The digest of the patch series ``make deps`` applied to the library in use, if it recorded one."""
    record = _read(deps.libvfio_user_patches_file())
    first = record.splitlines()[0] if record else ""
    return first.removeprefix("set ") if first.startswith("set ") else None


def collect(artefacts: GuestArtefacts | None = None, *, qemu: Path | None = None) -> Provenance:
    """Read every component's identity now; ``artefacts`` adds the guest kernel's."""
    try:
        version: str | None = metadata.version("vdev")
    except metadata.PackageNotFoundError:
        version = None
    binary = qemu or deps.qemu_path()
    return Provenance(
        vdev_commit=vdev_commit(),
        vdev_version=version,
        qemu_package_version=qemu_package_version() if qemu is None else None,
        qemu_version=_first_line([str(binary), "--version"]),
        libvfio_user_revision=_read(deps.libvfio_user_revision_file()),
        libvfio_user_patch_set=libvfio_user_patch_set(),
        kernel_name=artefacts.name if artefacts else None,
        kernel_package=artefacts.package if artefacts else None,
        kernel_package_version=artefacts.package_version if artefacts else None,
        kernel_release=artefacts.release if artefacts else None,
        kernel_patch=artefacts.patch if artefacts else None,
        kernel_patch_sha256=artefacts.patch_sha256 if artefacts else None,
    )
