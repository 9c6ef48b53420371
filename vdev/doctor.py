"""``vdev doctor``: is everything vdev needs here, and if not, what fixes it."""

from __future__ import annotations

import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vdev import deps
from vdev.libvfio_user import bindings


@dataclass
class Check:
    """One component: where it is, what it is, and the fix when it is missing."""

    name: str
    ok: bool
    path: str
    details: dict[str, str | bool] = field(default_factory=dict)
    problem: str = ""
    fix: str = ""


def check_libvfio_user() -> Check:
    path = deps.libvfio_user_path()
    try:
        found, revision = bindings.check(path)
        bindings.load()
    except bindings.LibraryError as exc:
        return Check("libvfio-user", False, str(path), problem=str(exc), fix=deps.PROVISION_COMMAND)
    return Check("libvfio-user", True, str(found), {"revision": revision})


def _run(command: list[str]) -> str:
    return subprocess.run(command, capture_output=True, text=True, timeout=30, check=False).stdout


def check_qemu(path: Path | None = None) -> Check:
    path = path or deps.qemu_path()
    if not path.exists():
        return Check("qemu", False, str(path), problem="QEMU not found", fix=deps.PROVISION_COMMAND)
    try:
        version_line = _run([str(path), "--version"]).splitlines()[0]
        has_vfio_user = '"vfio-user-pci"' in _run([str(path), "-device", "help"])
    except (OSError, IndexError, subprocess.TimeoutExpired) as exc:
        return Check("qemu", False, str(path), problem=f"QEMU does not run: {exc}", fix=deps.PROVISION_COMMAND)
    check = Check("qemu", has_vfio_user, str(path), {"version": version_line, "vfio-user-pci": has_vfio_user})
    if not has_vfio_user:
        check.problem = "this QEMU has no vfio-user-pci device (QEMU >= 10.1 needed)"
        check.fix = deps.PROVISION_COMMAND
    return check


def run_checks() -> list[Check]:
    return [check_libvfio_user(), check_qemu()]


def as_json(checks: list[Check]) -> dict[str, object]:
    return {"ok": all(c.ok for c in checks), "checks": [asdict(c) for c in checks]}


def as_text(checks: list[Check]) -> str:
    lines = []
    for check in checks:
        lines.append(f"{'ok     ' if check.ok else 'MISSING'} {check.name:13} {check.path}")
        lines.extend(f"        {key}: {value}" for key, value in check.details.items())
        if not check.ok:
            lines.append(f"        problem: {check.problem}")
            lines.append(f"        fix: run `{check.fix}`")
    return "\n".join(lines)
