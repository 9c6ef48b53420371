"""Which kernel ``vdev guest --kernel`` boots: a Debian set by name, or the user's own build by path.

A name (no ``/`` in it) is a set that ``make guest`` built
(:class:`~vdev.qemu.guest.GuestArtefacts`).  A path is one of

* a kernel build tree (the ``O=`` directory if there is one), recognised by
  ``include/config/kernel.release``: the image is ``arch/x86/boot/bzImage``
  or ``vmlinux``, the modules those ``make modules`` left in the tree (or
  ``lib/modules/<release>`` inside it after ``make modules_install
  INSTALL_MOD_PATH=<tree>``);
* a directory holding a kernel image and ``lib/modules/<release>``, as
  ``make install INSTALL_PATH=<dir>/boot`` with ``make modules_install
  INSTALL_MOD_PATH=<dir>`` leave them, and as a Debian kernel package
  unpacks (``boot/vmlinuz-<release>``).

A name must not contain a slash and a path must (``./linux``), so neither is
ever mistaken for the other.  For a path, the initramfs is built the way
``make guest`` builds a set's, by the same tool (``tools/guest/artefacts.py
initramfs``: busybox, ``guest/init``, the guest programs, the modules of
``guest/modules`` and their dependencies), except that every listed module
is optional: the caller names the ones it needs (``require``).  A compressed
image is booted as the ELF vmlinux inside it when it has a PVH entry (twice
as fast under TCG), extracted once into the kernel build cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from vdev import deps
from vdev.guest.errors import KernelError
from vdev.qemu.guest import GUEST_BUILD_COMMAND, GuestArtefacts, guest_dir

_ELF_MAGIC = b"\x7fELF"

Progress = Callable[[str], None]


def kernel_sets(directory: Path | None = None) -> list[str]:
    """The names of the kernel sets ``make guest`` has built."""
    where = directory or guest_dir()
    if not where.is_dir():
        return []
    return sorted(entry.name for entry in where.iterdir() if (entry / "kernel.json").is_file())


def find_kernel(
    spec: str | os.PathLike[str],
    *,
    require: Sequence[str] = (),
    progress: Progress | None = None,
) -> GuestArtefacts:
    """The kernel and initramfs for ``spec``: a set name, or a path (containing ``/``) to a kernel of one's own.

    ``require`` names modules the run needs (kernel names, e.g.
    ``vfio_pci``): a kernel that neither builds them in nor has them is a
    :class:`KernelError`.  ``progress`` hears a line per step taken.
    """
    text = os.fspath(spec)
    if "/" not in text:
        return _kernel_set(text, require)
    return own_kernel(Path(text), require=require, progress=progress)


def _kernel_set(name: str, require: Sequence[str]) -> GuestArtefacts:
    try:
        artefacts = GuestArtefacts.find(name)
    except FileNotFoundError as exc:
        built = ", ".join(kernel_sets()) or "none"
        raise KernelError(f"{exc} (sets built: {built}; a kernel of your own is a path, e.g. ./linux)") from None
    missing = [name for name in require if name not in artefacts.modules]
    if missing:
        raise KernelError(f"kernel set {artefacts.name} does not load {', '.join(missing)} (guest/modules)")
    return artefacts


def own_kernel(path: Path, *, require: Sequence[str] = (), progress: Progress | None = None) -> GuestArtefacts:
    """A kernel of the user's own build at ``path`` (see the module's docstring), with an initramfs made for it."""
    say = progress or (lambda line: None)
    if not path.exists():
        raise KernelError(f"{path}: no such directory")
    if not path.is_dir():
        raise KernelError(
            f"{path} is not a directory: give a kernel build tree, or a directory with a kernel image "
            "and lib/modules/<release>"
        )
    path = path.resolve()
    if (path / "include" / "config" / "kernel.release").is_file():
        image, release, module_args = _build_tree(path)
    else:
        image, release, module_args = _installed(path)
    boot = _bootable(image, say)
    initrd, summary = _initramfs(path, module_args, say)
    present = set(summary["order"]) | set(summary["builtin"])
    missing = [name for name in require if name not in present]
    if missing:
        raise KernelError(f"{path}: module {', '.join(missing)} is neither built into {release} nor among its modules")
    return GuestArtefacts(
        name=str(path),
        kernel=boot,
        bzimage=image,
        initrd=initrd,
        release=release,
        package=None,
        package_version=None,
        modules=tuple(summary["order"]),
    )


def _build_tree(tree: Path) -> tuple[Path, str, list[str]]:
    release = (tree / "include" / "config" / "kernel.release").read_text().strip()
    if not release:
        raise KernelError(f"{tree}: include/config/kernel.release is empty; run `make` in the tree")
    image = next((p for p in (tree / "arch/x86/boot/bzImage", tree / "vmlinux") if p.is_file()), None)
    if image is None:
        raise KernelError(f"{tree}: a kernel build tree without a kernel image (no arch/x86/boot/bzImage or vmlinux)")
    if _module_dir(tree, release) is not None:
        return image, release, ["--root", str(tree), "--release", release]
    return image, release, ["--tree", str(tree)]


def _module_dir(root: Path, release: str) -> Path | None:
    for candidate in (root / "lib" / "modules" / release, root / "usr" / "lib" / "modules" / release):
        if (candidate / "kernel").is_dir():
            return candidate
    return None


def _installed(root: Path) -> tuple[Path, str, list[str]]:
    releases = sorted(
        entry.name
        for parent in (root / "lib" / "modules", root / "usr" / "lib" / "modules")
        if parent.is_dir()
        for entry in parent.iterdir()
        if (entry / "kernel").is_dir()
    )
    images = {release: _image_for(root, release) for release in releases}
    with_image = [release for release, image in images.items() if image is not None]
    generic = _image_for(root, None)
    if not releases:
        if generic is None:
            raise KernelError(
                f"{root}: neither a kernel build tree (no include/config/kernel.release) nor a directory "
                "with a kernel image and lib/modules/<release>"
            )
        raise KernelError(
            f"{root}: kernel image {generic.relative_to(root)} but no lib/modules/<release> "
            f"(install the modules with `make modules_install INSTALL_MOD_PATH={root}`)"
        )
    if len(with_image) > 1:
        raise KernelError(
            f"{root}: kernel images for several releases ({', '.join(with_image)}); give one directory each"
        )
    if with_image:
        release = with_image[0]
        image = images[release]
    elif len(releases) == 1 and generic is not None:
        release, image = releases[0], generic
    else:
        raise KernelError(
            f"{root}: no kernel image for {' or '.join(releases)} "
            "(looked for boot/vmlinuz-<release>, vmlinuz, bzImage and vmlinux)"
        )
    assert image is not None
    return image, release, ["--root", str(root), "--release", release]


def _image_for(root: Path, release: str | None) -> Path | None:
    """The kernel image in ``root`` for ``release`` (``None``: one named for no release)."""
    if release is not None:
        candidates = [
            root / "boot" / f"vmlinuz-{release}",
            root / f"vmlinuz-{release}",
            root / "lib" / "modules" / release / "vmlinuz",
            root / "usr" / "lib" / "modules" / release / "vmlinuz",
            root / "boot" / f"vmlinux-{release}",
        ]
    else:
        candidates = [root / name for name in ("vmlinuz", "bzImage", "vmlinux", "boot/vmlinuz", "boot/bzImage")]
    return next((candidate for candidate in candidates if candidate.is_file()), None)


def _checkout() -> Path:
    """The vdev checkout, whose ``tools/guest`` and ``guest/`` make the initramfs for a kernel of one's own."""
    root = deps.checkout()
    if root is None:
        raise KernelError("a kernel of your own needs vdev's checkout (tools/guest/artefacts.py, guest/)")
    return root


def _run_tool(*args: str) -> subprocess.CompletedProcess[str]:
    tool = _checkout() / "tools" / "guest" / "artefacts.py"
    return subprocess.run([sys.executable, str(tool), *args], capture_output=True, text=True, check=False)


def _bootable(image: Path, say: Progress) -> Path:
    """``image`` itself when it is an ELF vmlinux, else the ELF inside it (cached), else the bzImage."""
    with open(image, "rb") as file:
        if file.read(4) == _ELF_MAGIC:
            return image
    digest = _sha256(image)
    out = deps.kernel_build_dir() / "vmlinux" / f"{digest[:24]}.elf"
    if out.is_file():
        return out
    refused = out.with_suffix(".no-pvh")
    if refused.is_file():
        return image
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.with_name(f"{out.name}.{os.getpid()}")
    done = _run_tool("vmlinux", str(image), str(temporary))
    if done.returncode != 0:
        # Kept as a note: without a PVH entry the bzImage boots, only slower.
        refused.write_text(done.stderr)
        say(f"booting the compressed image (no vmlinux with a PVH entry inside it: {done.stderr.strip()})")
        return image
    temporary.replace(out)
    say(f"extracted the vmlinux inside {image} ({done.stdout.strip()}) into {out.parent}")
    return out


def _initramfs(path: Path, module_args: list[str], say: Progress) -> tuple[Path, dict[str, list[str]]]:
    busybox = guest_dir() / "busybox" / "bin" / "busybox"
    programs = guest_dir() / "programs"
    if not busybox.is_file() or not programs.is_dir():
        raise KernelError(f"a guest initramfs needs busybox and the guest programs from `{GUEST_BUILD_COMMAND}`")
    sources = _checkout() / "guest"
    out_dir = deps.kernel_build_dir() / "kernels" / hashlib.sha256(str(path).encode()).hexdigest()[:24]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "source").write_text(f"{path}\n")
    temporary = out_dir / f"initramfs.cpio.gz.{os.getpid()}"
    summary_file = out_dir / f"summary.json.{os.getpid()}"
    done = _run_tool(
        "initramfs",
        *module_args,
        "--list",
        str(sources / "modules"),
        "--optional",
        "--busybox",
        str(busybox),
        "--init",
        str(sources / "init"),
        "--scripts",
        str(sources / "bin"),
        "--programs",
        str(programs),
        "--out",
        str(temporary),
        "--summary",
        str(summary_file),
    )
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or [f"status {done.returncode}"]
        raise KernelError(f"{path}: cannot build its initramfs: {lines[-1].removeprefix('artefacts.py initramfs: ')}")
    summary: dict[str, list[str]] = json.loads(summary_file.read_text())
    summary_file.unlink()
    initrd = out_dir / "initramfs.cpio.gz"
    temporary.replace(initrd)
    loaded = " ".join(summary["order"]) or "none"
    builtin = f"; built in: {' '.join(summary['builtin'])}" if summary["builtin"] else ""
    say(f"initramfs for {path}: modules {loaded}{builtin}")
    return initrd, summary


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()
