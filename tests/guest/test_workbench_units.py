"""``vdev guest``'s parts that need no boot: kernel paths, patches, module builds' bookkeeping, output, exit codes.

What the user sees when an argument is wrong is one line naming what is
missing; these tests pin those lines, the patch reading that decides what is
rebuilt, and how the console is cut into the command's output.
"""

from __future__ import annotations

import io
import lzma
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from vdev.guest import (
    EXIT_FAILED,
    EXIT_KERNEL_PROBLEM,
    EXIT_TIMEOUT,
    GuestOutcome,
    GuestSetupError,
    KernelError,
    ModuleBuildError,
    build_patched_modules,
    command_script,
    files_from_copy,
    find_kernel,
    own_kernel,
    patch_files,
)
from vdev.guest.modules import _touched_modules, extract_directories
from vdev.guest.session import COMMAND_SCRIPT, _ConsoleWatcher
from vdev.provenance import Provenance
from vdev.qemu.guest import GuestArtefacts, GuestKernelError, GuestResult, GuestTimeoutError
from vdev_experiments.mse import MseConfig, MseRun, ServerLog, Verdict, markdown_summary

CONTROLS = Path(__file__).resolve().parents[2] / "controls"


# -- patches ----------------------------------------------------------------------------------


def test_the_controls_change_vfio_pci_core_only() -> None:
    for patch in sorted(CONTROLS.glob("*.diff")):
        assert patch_files(patch.read_text()) == ["drivers/vfio/pci/vfio_pci_core.c"], patch.name


def test_new_and_deleted_files_count_and_hunk_lines_do_not() -> None:
    diff = """diff --git a/drivers/x/new.c b/drivers/x/new.c
--- /dev/null
+++ b/drivers/x/new.c
@@ -0,0 +1 @@
+int x;
--- a/drivers/y/gone.c
+++ /dev/null
@@ -1,2 +0,0 @@
--- a decremented line
-int y;
"""
    assert patch_files(diff) == ["drivers/x/new.c", "drivers/y/gone.c"]


@pytest.mark.parametrize("path", ["x.c", "b/../etc/passwd"])
def test_a_patch_without_one_prefix_level_is_refused(path: str) -> None:
    with pytest.raises(ModuleBuildError, match="patch -p1"):
        patch_files(f"--- {path}\n+++ {path}\n@@ -1 +1 @@\n-a\n+b\n")


def _debian_set(tmp_path: Path, version: str = "6.1.176-1") -> GuestArtefacts:
    return GuestArtefacts(
        name="bookworm",
        kernel=tmp_path / "vmlinux",
        bzimage=tmp_path / "bzImage",
        initrd=tmp_path / "initrd",
        release="6.1.0-50-amd64",
        package="linux-image-6.1.0-50-amd64",
        package_version=version,
        modules=("vfio", "vfio_pci_core", "vfio_pci"),
    )


def test_a_patch_to_headers_is_refused_before_anything_is_downloaded(tmp_path: Path) -> None:
    patch = tmp_path / "h.diff"
    patch.write_text("--- a/include/linux/vfio.h\n+++ b/include/linux/vfio.h\n@@ -1 +1 @@\n-a\n+b\n")
    with pytest.raises(ModuleBuildError, match="include/linux/vfio.h.*--kernel PATH"):
        build_patched_modules(_debian_set(tmp_path), patch)


def test_a_patch_for_a_kernel_of_ones_own_is_refused(tmp_path: Path) -> None:
    own = GuestArtefacts("/src/linux", tmp_path, tmp_path, tmp_path, "6.9.0", None, None, ())
    with pytest.raises(ModuleBuildError, match="needs a Debian kernel set"):
        build_patched_modules(own, CONTROLS / "vfio-pci-6.1-fork-no-zap.diff")


@pytest.mark.skipif(shutil.which("apt-cache") is None, reason="needs a Debian host's apt")
def test_a_kernel_version_the_archive_does_not_have_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An empty deps cache: only the host's apt is asked (bookworm's kernels are there).
    monkeypatch.setenv("VDEV_DEPS_DIR", str(tmp_path / "deps"))
    with pytest.raises(ModuleBuildError, match="has no linux-headers-6.1.0-50-amd64 6.1.0-0 .*it has: "):
        build_patched_modules(_debian_set(tmp_path, "6.1.0-0"), CONTROLS / "vfio-pci-6.1-fork-no-zap.diff")


def _tarball(tmp_path: Path, names: list[str]) -> Path:
    """A kernel-source-like .tar.xz with one small file per name, in this order."""
    path = tmp_path / "linux-source-9.9.tar.xz"
    with lzma.open(path, "wb") as packed, tarfile.open(fileobj=packed, mode="w") as archive:
        for name in names:
            data = name.encode()
            info = tarfile.TarInfo(f"linux-source-9.9/{name}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def test_only_the_wanted_directories_are_unpacked(tmp_path: Path) -> None:
    tarball = _tarball(tmp_path, ["Makefile", "drivers/vfio/pci/a.c", "drivers/vfio/pci/sub/b.c", "drivers/vfio/x.c"])
    top = extract_directories(tarball, ["drivers/vfio/pci"], tmp_path / "out")
    assert top == "linux-source-9.9"
    unpacked = sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*.c"))
    assert unpacked == ["linux-source-9.9/drivers/vfio/pci/a.c", "linux-source-9.9/drivers/vfio/pci/sub/b.c"]


def test_a_directory_the_source_lacks_is_named(tmp_path: Path) -> None:
    with pytest.raises(ModuleBuildError, match="has no drivers/nothing"):
        extract_directories(_tarball(tmp_path, ["Makefile"]), ["drivers/nothing"], tmp_path / "out")


def test_the_modules_touched_are_those_whose_objects_depend_on_a_changed_file(tmp_path: Path) -> None:
    build = tmp_path / "drivers/vfio/pci"
    build.mkdir(parents=True)
    (build / "modules.order").write_text(f"{build}/vfio-pci-core.ko\n{build}/vfio-pci.ko\n")
    (build / "vfio-pci-core.mod").write_text(f"{build}/vfio_pci_core.o\n{build}/vfio_pci_intrs.o\n")
    (build / "vfio-pci.mod").write_text(f"{build}/vfio_pci.o\n")
    (build / ".vfio_pci_core.o.cmd").write_text(
        f"source_x := {build}/vfio_pci_core.c\ndeps_x := \\\n  {build}/priv.h \\\n"
    )
    (build / ".vfio_pci_intrs.o.cmd").write_text(
        f"source_y := {build}/vfio_pci_intrs.c\ndeps_y := \\\n  {build}/priv.h \\\n"
    )
    (build / ".vfio_pci.o.cmd").write_text(f"source_z := {build}/vfio_pci.c\n")

    core = _touched_modules(tmp_path, ["drivers/vfio/pci"], [build / "vfio_pci_core.c"])
    assert core == {"vfio_pci_core": build / "vfio-pci-core.ko"}
    header = _touched_modules(tmp_path, ["drivers/vfio/pci"], [build / "priv.h"])
    assert list(header) == ["vfio_pci_core"]
    # vfio_pci.c is not vfio_pci_core.c, though one name starts the other.
    assert list(_touched_modules(tmp_path, ["drivers/vfio/pci"], [build / "vfio_pci.c"])) == ["vfio_pci"]


# -- kernels given by path ----------------------------------------------------------------------


def test_a_missing_path_is_named(tmp_path: Path) -> None:
    with pytest.raises(KernelError, match="nothing-here: no such directory"):
        find_kernel(str(tmp_path / "nothing-here"))


def test_a_file_is_not_a_kernel_directory(tmp_path: Path) -> None:
    (tmp_path / "bzImage").write_bytes(b"")
    with pytest.raises(KernelError, match="is not a directory"):
        find_kernel(str(tmp_path / "bzImage"))


def test_an_image_without_modules_says_how_to_install_them(tmp_path: Path) -> None:
    (tmp_path / "boot").mkdir()
    (tmp_path / "boot" / "vmlinuz").write_bytes(b"")
    with pytest.raises(KernelError, match=r"boot/vmlinuz but no lib/modules/<release> .*INSTALL_MOD_PATH="):
        find_kernel(str(tmp_path))


def test_modules_without_an_image_say_where_it_was_looked_for(tmp_path: Path) -> None:
    (tmp_path / "lib/modules/6.9.0/kernel").mkdir(parents=True)
    with pytest.raises(KernelError, match=r"no kernel image for 6.9.0 \(looked for boot/vmlinuz-<release>"):
        find_kernel(str(tmp_path))


def test_a_build_tree_without_an_image_says_so(tmp_path: Path) -> None:
    (tmp_path / "include/config").mkdir(parents=True)
    (tmp_path / "include/config/kernel.release").write_text("6.9.0\n")
    with pytest.raises(KernelError, match="build tree without a kernel image"):
        find_kernel(str(tmp_path))


def test_an_unknown_set_name_lists_the_sets_built(guest_artefacts: GuestArtefacts) -> None:
    with pytest.raises(KernelError, match=f"sets built: .*{guest_artefacts.name}"):
        find_kernel("no-such-suite")


def _build_tree(tmp_path: Path, artefacts: GuestArtefacts, modules: list[str], *, order_suffix: str) -> Path:
    """A kernel build tree made of the set's image and some of its modules, as `make` leaves them."""
    tree = tmp_path / "linux"
    (tree / "include/config").mkdir(parents=True)
    (tree / "include/config/kernel.release").write_text(f"{artefacts.release}\n")
    os.symlink(artefacts.kernel, tree / "vmlinux")
    installed = artefacts.initrd.parent / "root/lib/modules" / artefacts.release / "kernel"
    lines = []
    for name in modules:
        source = next(installed.rglob(f"{name}.ko*"))
        relative = source.relative_to(installed).with_name(f"{name}.ko")
        (tree / relative).parent.mkdir(parents=True, exist_ok=True)
        data = source.read_bytes()  # Debian may compress its modules; a build tree holds plain ones
        (tree / relative).write_bytes(lzma.decompress(data) if source.name.endswith(".xz") else data)
        lines.append(str(relative.with_suffix(order_suffix)))
    (tree / "modules.order").write_text("".join(f"{line}\n" for line in lines))
    return tree


def test_a_build_tree_boots_its_vmlinux_with_the_modules_it_built(
    guest_artefacts: GuestArtefacts, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VDEV_KERNEL_BUILD_DIR", str(tmp_path / "builds"))
    root = guest_artefacts.initrd.parent / "root"
    if not root.is_dir():
        pytest.skip(f"the set's unpacked packages are not kept in {root}")
    # Since 6.6 modules.order names objects (.o); before, modules (.ko).
    tree = _build_tree(tmp_path, guest_artefacts, ["vfio", "irqbypass", "uio"], order_suffix=".o")
    artefacts = own_kernel(tree)
    assert artefacts.kernel == tree / "vmlinux"  # an ELF: booted as it is
    assert artefacts.release == guest_artefacts.release
    assert artefacts.package is None
    assert set(artefacts.modules) >= {"vfio", "uio"} and "vfio_pci" not in artefacts.modules
    with pytest.raises(KernelError, match="module vfio_pci is neither built into"):
        own_kernel(tree, require=["vfio_pci"])


# -- the run's bookkeeping ---------------------------------------------------------------------------


def test_copies_land_in_root_unless_a_guest_path_is_given(tmp_path: Path) -> None:
    (tmp_path / "t.sh").write_text("echo hi\n")
    (tmp_path / "tree/sub").mkdir(parents=True)
    (tmp_path / "tree/sub/x").write_text("x")
    assert files_from_copy(str(tmp_path / "t.sh")) == {"/root/t.sh": tmp_path / "t.sh"}
    assert files_from_copy(f"{tmp_path / 't.sh'}:/opt/run") == {"/opt/run": tmp_path / "t.sh"}
    assert files_from_copy(f"{tmp_path / 'tree'}:/srv/") == {"/srv/sub/x": tmp_path / "tree/sub/x"}
    with pytest.raises(GuestSetupError, match="no such file or directory"):
        files_from_copy(str(tmp_path / "absent"))


def test_the_command_runs_in_root_under_sh() -> None:
    assert command_script("exit 7") == "#!/bin/sh\ncd /root\nexit 7\n"


def _console_lines(*lines: str) -> bytes:
    return "".join(f"{line}\r\n" for line in lines).encode()


async def test_the_command_output_is_what_came_between_its_start_and_exit() -> None:
    seen: list[bytes] = []
    console = _ConsoleWatcher(seen.append, lambda line: None, raw=False)
    data = _console_lines(
        "[    1.0] booting",
        'VDEV {"kind":"run.start","cmd":"vfio-bind 0000:00:03.0"}',
        'VDEV {"kind":"run.exit","cmd":"vfio-bind 0000:00:03.0","status":0}',
        f'VDEV {{"kind":"run.start","cmd":"{COMMAND_SCRIPT}"}}',
        "0x1b36",
        f'no newline at the end VDEV {{"kind":"run.exit","cmd":"{COMMAND_SCRIPT}","status":7}}',
        'VDEV {"kind":"init.done"}',
    )
    for start in range(0, len(data), 7):  # in pieces, as the console arrives
        console.feed(data[start : start + 7])
    assert b"".join(seen) == b"0x1b36\nno newline at the end \n"
    assert console.text == "0x1b36\nno newline at the end \n"


async def test_an_interactive_console_passes_every_byte_and_notes_the_boot() -> None:
    seen: list[bytes] = []
    said: list[str] = []
    console = _ConsoleWatcher(seen.append, said.append, raw=True)
    console.feed(b"[ 0.0] Linux version 6.1.0-50-amd64 (gcc)\r\n/ # ")
    assert b"".join(seen) == b"[ 0.0] Linux version 6.1.0-50-amd64 (gcc)\r\n/ # "
    assert len(said) == 1 and "the kernel started: Linux version 6.1.0-50-amd64" in said[0]


def _outcome(**fields: object) -> GuestOutcome:
    artefacts = GuestArtefacts("x", Path("k"), Path("k"), Path("i"), "r", None, None, ())
    provenance = Provenance(None, None, None, None, None)
    return GuestOutcome(artefacts=artefacts, provenance=provenance, console_log=Path("c"), **fields)  # type: ignore[arg-type]


def test_exit_status_is_the_commands_unless_the_kernel_or_the_machine_failed() -> None:
    assert _outcome(status=7).exit_status == 7
    assert _outcome(status=0, kernel_error=GuestKernelError("x", ["BUG: x"])).exit_status == EXIT_KERNEL_PROBLEM
    assert _outcome(error=GuestTimeoutError("late")).exit_status == EXIT_TIMEOUT
    started = GuestResult("run.start", {"kind": "run.start", "cmd": COMMAND_SCRIPT}, 1.0, 1)
    assert _outcome(results=[started]).exit_status == EXIT_FAILED  # the guest ended before the command did
    assert _outcome().exit_status == 0  # no command: booted and powered off
    assert len({EXIT_KERNEL_PROBLEM, EXIT_TIMEOUT, EXIT_FAILED, 2}) == 4


def test_the_experiment_summary_names_the_patch_and_each_kernel_problem() -> None:
    provenance = Provenance(
        vdev_commit="abc",
        vdev_version="0.1.0",
        qemu_package_version="1:11.1.3",
        qemu_version="QEMU emulator version 11.1.3",
        libvfio_user_revision="0b28d205",
        kernel_name="bookworm",
        kernel_package="linux-image-6.1.0-50-amd64",
        kernel_package_version="6.1.176-1",
        kernel_release="6.1.0-50-amd64",
        kernel_patch="vfio-pci-6.1-concurrent-fault.diff",
        kernel_patch_sha256="d3314804465224639bea",
    )
    bug = "[   16.97] kernel BUG at mm/memory.c:2402!"
    runs = [
        MseRun(
            kernel="bookworm",
            release="6.1.0-50-amd64",
            config=MseConfig(),
            results=[],
            server=ServerLog(),
            verdicts=[Verdict("completed", False, "ended by a kernel problem"), Verdict("kernel_clean", False, bug)],
            console_log=Path("console.log"),
            boot_seconds=None,
            seconds=1.0,
            provenance=provenance,
            repeat=repeat,
        )
        for repeat in (1, 2)
    ]
    summary = markdown_summary(runs)
    assert "rebuilt with `vfio-pci-6.1-concurrent-fault.diff` (sha256 d33148044652)" in summary
    assert "| guest | `kernel_clean` | 0/2 |" in summary
    assert f"* guest #1: `{bug}`" in summary and f"* guest #2: `{bug}`" in summary


# -- the command line's errors -------------------------------------------------------------------------


def vdev(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vdev", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--param", "x=1"], "--param must follow the --device it belongs to"),
        (["--kernel", "/no/such/kernel"], "/no/such/kernel: no such directory"),
        (["--socket", "/no/such.sock", "--run", "true"], "--socket /no/such.sock: no vfio-user server socket there"),
        (["--copy", "/no/such/file", "--run", "true"], "--copy /no/such/file: no such file or directory"),
        (["--device", "nonexistent-device"], "nonexistent-device"),
        (["--device", "hello", "--param", "nope=1"], "has no parameter 'nope'"),
        (["--timeout", "0", "--run", "true"], "--timeout must be positive"),
    ],
)
def test_wrong_arguments_get_one_line_and_status_2(args: list[str], message: str) -> None:
    done = vdev("guest", *args)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and message in done.stderr
