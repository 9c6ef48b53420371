"""``vdev doctor``: is everything vdev needs here, and if not, what fixes it.

libvfio-user and QEMU are required (the exit status says whether they are
usable); the guest artefacts and the test extras are reported too, as
optional, because only guest tests and the pytest kit need them.  A fix
names what is actually wrong: a bad ``VDEV_QEMU`` is fixed by fixing it,
not by provisioning.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vdev import deps
from vdev.libvfio_user import bindings, serve_loop


@dataclass
class Check:
    """One component: where it is, what it is, and the fix when it is missing."""

    name: str
    ok: bool
    path: str
    details: dict[str, str | bool] = field(default_factory=dict)
    problem: str = ""
    fix: str = ""
    #: Whether vdev cannot serve or test without it (the exit status counts only these).
    required: bool = True
    #: libvfio-user only: each of vdev's patches (file name) and whether the library has it.
    patches: dict[str, bool] = field(default_factory=dict)


def _patch_set(record: Path) -> str:
    """What ``make deps`` recorded about the patch set it applied, in one line."""
    try:
        lines = record.read_text().splitlines()
    except OSError:
        return "none recorded (not built by `make deps`)"
    digest = lines[0].removeprefix("set ")[:12] if lines else "?"
    return f"{digest} ({len(lines) - 1} patches, recorded in {record})"


def check_libvfio_user() -> Check:
    """Found, loadable, a supported revision; and which of vdev's fixes it carries.

    A library without vdev's patches (a user's own build) is usable: vdev
    serves with it, and what needs a missing patch says so when used.
    """
    path = deps.libvfio_user_path()
    try:
        found, revision = bindings.check(path)
        library = bindings.load()
    except bindings.LibraryError as exc:
        problem = str(exc).partition("; run")[0]  # the fix has a line of its own
        return Check("libvfio-user", False, str(path), problem=problem, fix=deps.how_to_provide("VDEV_LIBVFIO_USER"))
    details: dict[str, str | bool] = {
        "revision": revision,
        "patch set": _patch_set(deps.libvfio_user_patches_file()),
        "fixes": f"{len(library.fixes)} of {len(bindings.FIXES)}",
    }
    patches = {fix.patch: library.has(fix.name) for fix in bindings.FIXES}
    return Check("libvfio-user", True, str(found), details, patches=patches)


def check_serve_loop() -> Check:
    """vdev's serving loop (C): built for the shipped source, or buildable now (it is, if a compiler is here)."""
    path = serve_loop.library_path()
    try:
        serve_loop.load()
    except serve_loop.ServeLoopError as exc:
        return Check(
            "serving loop", False, str(path), problem=str(exc), fix="install gcc (or set CC), then `make deps`"
        )
    return Check("serving loop", True, str(path), {"source": str(serve_loop.SOURCE)})


def _run(command: list[str]) -> str:
    return subprocess.run(command, capture_output=True, text=True, timeout=30, check=False).stdout


def check_qemu(path: Path | None = None) -> Check:
    path = path or deps.qemu_path()
    fix = deps.how_to_provide("VDEV_QEMU")
    if not path.exists():
        return Check("qemu", False, str(path), problem="QEMU not found", fix=fix)
    try:
        version_line = _run([str(path), "--version"]).splitlines()[0]
        has_vfio_user = '"vfio-user-pci"' in _run([str(path), "-device", "help"])
    except (OSError, IndexError, subprocess.TimeoutExpired) as exc:
        return Check("qemu", False, str(path), problem=f"QEMU does not run: {exc}", fix=fix)
    check = Check("qemu", has_vfio_user, str(path), {"version": version_line, "vfio-user-pci": has_vfio_user})
    if not has_vfio_user:
        check.problem = "this QEMU has no vfio-user-pci device (QEMU >= 10.1 needed)"
        check.fix = fix
    return check


def check_guest() -> Check:
    """The default guest kernel set that ``make guest`` builds (for the guest tests)."""
    from vdev.qemu.guest import DEFAULT_GUEST, GUEST_BUILD_COMMAND, GuestArtefacts, guest_dir

    where = guest_dir() / DEFAULT_GUEST
    fix = deps.how_to_provide("VDEV_GUEST_DIR", GUEST_BUILD_COMMAND)
    try:
        artefacts = GuestArtefacts.find(DEFAULT_GUEST)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        return Check("guest", False, str(where), problem=str(exc).partition("; run")[0], fix=fix, required=False)
    details: dict[str, str | bool] = {"kernel": artefacts.release, "initramfs": str(artefacts.initrd)}
    return Check("guest", True, str(where), details, required=False)


#: What the pytest kit and the QEMU harness import, and the distribution that provides it.
TEST_EXTRAS = {"pytest": "pytest", "pytest_trio": "pytest-trio", "qemu.qmp": "qemu.qmp"}


def check_test_extras() -> Check:
    """The ``test`` extra: pytest and pytest-trio for the fixtures, qemu.qmp for QEMU machines."""
    found: dict[str, str | bool] = {}
    missing = []
    for module, distribution in TEST_EXTRAS.items():
        try:
            present = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            present = False
        if not present:
            missing.append(distribution)
            continue
        try:
            found[distribution] = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            found[distribution] = True
    check = Check("test extras", not missing, ", ".join(TEST_EXTRAS.values()), found, required=False)
    if missing:
        check.problem = f"not installed: {', '.join(missing)}"
        check.fix = "install vdev with its test extra: pip install 'vdev[test]' (or the checkout path with [test])"
    return check


def run_checks() -> list[Check]:
    return [check_libvfio_user(), check_serve_loop(), check_qemu(), check_guest(), check_test_extras()]


def usable(checks: list[Check]) -> bool:
    """Whether every required component is there (what the exit status says)."""
    return all(c.ok for c in checks if c.required)


def as_json(checks: list[Check]) -> dict[str, object]:
    return {"ok": usable(checks), "checks": [asdict(c) for c in checks]}


def as_text(checks: list[Check]) -> str:
    lines = []
    for check in checks:
        status = "ok     " if check.ok else "MISSING" if check.required else "missing"
        optional = "" if check.required or check.ok else " (optional)"
        lines.append(f"{status} {check.name:13} {check.path}{optional}")
        lines.extend(f"        {key}: {value}" for key, value in check.details.items())
        lines.extend(f"          {'present' if has else 'MISSING'}  {patch}" for patch, has in check.patches.items())
        if not check.ok:
            lines.append(f"        problem: {check.problem}")
            lines.append(f"        fix: {check.fix}")
    return "\n".join(lines)
