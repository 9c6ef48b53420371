#!/usr/bin/env python3
"""Binary chores behind ``tools/guest.sh``: a vmlinux out of a bzImage, the
module closure a guest needs, and a cpio (newc) initramfs.

Standard library only, so the host's ``python3`` runs it before any virtual
environment exists.  Rules it relies on:

* A bzImage's setup header (Documentation/arch/x86/boot.rst) names its
  compressed payload: ``payload_offset`` and ``payload_length`` (protocol
  >= 2.08), counted from the protected-mode code, which starts after
  ``(setup_sects + 1) * 512`` bytes.  The kernel build appends the
  uncompressed size as 4 little-endian bytes to every payload but gzip's.
  The payload decompresses to ``vmlinux.bin``: the stripped ELF vmlinux,
  followed by relocation data that we cut off at the ELF's own end.
* QEMU boots an ELF ``-kernel`` on x86 only through the PVH entry point, so a
  vmlinux without the Xen ``PHYS32_ENTRY`` note is useless to it: we refuse to
  write one and the caller keeps the bzImage.
* Debian's kernel packages ship no ``modules.dep`` (``depmod`` runs at install
  time), so dependencies come from each module's ``.modinfo`` section
  (``depends=`` and the ``pre:`` part of ``softdep=``).  Names compare with
  ``-`` and ``_`` equal, as the kernel's do.  A soft dependency may name an
  alias rather than a module (``crc-t10dif`` wants ``crct10dif``, which
  ``crct10dif_generic`` provides), and modprobe goes on without it, so one
  that is no module file is noted and skipped.  Modules listed in
  ``modules.builtin`` are part of the kernel and need no loading.
* Busybox's ``insmod`` loads only plain ELF modules, so ``.ko.xz``,
  ``.ko.zst`` and ``.ko.gz`` are decompressed here.
* Modules come from an installed tree (``ROOT/lib/modules/REL/kernel``, as
  Debian's packages and ``make modules_install INSTALL_MOD_PATH=ROOT`` lay
  them out) or from a kernel build tree, where ``modules.order`` names every
  module built (``.ko`` paths up to 6.5, ``.o`` since) and
  ``modules.builtin`` the built-in ones.
* Every cpio entry is owned by root with mtime 0, so the same inputs give the
  same archive.

Usage::

    artefacts.py vmlinux BZIMAGE OUT
    artefacts.py modules (--root ROOT --release REL | --tree TREE) --list FILE [--optional] --out DIR
    artefacts.py cpio --dir DIR --out FILE.gz [--node PATH:MODE:MAJOR:MINOR ...]
    artefacts.py initramfs (--root ROOT --release REL | --tree TREE) --list FILE [--optional]
                 --busybox BUSYBOX --init FILE --scripts DIR --programs DIR --out FILE.gz
                 [--load-order FILE] [--summary FILE.json]
"""

from __future__ import annotations

import argparse
import gzip
import json
import lzma
import os
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path


class BuildError(Exception):
    """A step failed in a way the user must fix; the message says how."""


# --- vmlinux ------------------------------------------------------------------

XEN_ELFNOTE_PHYS32_ENTRY = 18
PT_NOTE = 4


def _zstd_decompress(data: bytes) -> bytes:
    if shutil.which("zstd") is None:
        raise BuildError("the kernel payload is zstd-compressed but the `zstd` tool is missing (package zstd)")
    result = subprocess.run(["zstd", "-d", "-c", "-q"], input=data, capture_output=True, check=False)
    if result.returncode != 0:
        raise BuildError(f"zstd could not decompress the kernel payload: {result.stderr.decode(errors='replace')}")
    return result.stdout


def _xz_decompress(data: bytes) -> bytes:
    return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data)


def _gzip_decompress(data: bytes) -> bytes:
    return zlib.decompressobj(wbits=16 + zlib.MAX_WBITS).decompress(data)


_PAYLOAD_FORMATS = [
    (b"\xfd7zXZ\x00", "xz", _xz_decompress),
    (b"\x28\xb5\x2f\xfd", "zstd", _zstd_decompress),
    (b"\x1f\x8b", "gzip", _gzip_decompress),
]


def bzimage_payload(image: bytes) -> tuple[str, bytes]:
    """The compression name and the decompressed payload (``vmlinux.bin``) of ``image``."""
    if image[0x202:0x206] != b"HdrS":
        raise BuildError("not a bzImage: no 'HdrS' setup header signature at 0x202")
    (version,) = struct.unpack_from("<H", image, 0x206)
    if version < 0x208:
        raise BuildError(f"boot protocol {version:#x} is older than 2.08 and names no payload")
    setup_sects = image[0x1F1] or 4
    payload_offset, payload_length = struct.unpack_from("<II", image, 0x248)
    start = (setup_sects + 1) * 512 + payload_offset
    payload = image[start : start + payload_length]
    for magic, name, decompress in _PAYLOAD_FORMATS:
        if payload.startswith(magic):
            try:
                data = decompress(payload if name == "gzip" else payload[:-4])
            except (lzma.LZMAError, zlib.error, EOFError) as exc:
                raise BuildError(f"the {name} kernel payload does not decompress: {exc}") from exc
            if name != "gzip":
                (expected,) = struct.unpack("<I", payload[-4:])
                if expected != len(data):
                    raise BuildError(f"the {name} payload gave {len(data)} bytes, its trailer says {expected}")
            return name, data
    raise BuildError(f"unsupported kernel payload compression (magic {payload[:6].hex()}); xz, zstd and gzip are")


def elf_extent(elf: bytes) -> int:
    """Where a 64-bit little-endian ELF file ends (its headers, segments and sections)."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        raise BuildError("the decompressed payload is not a 64-bit little-endian ELF file")
    phoff, shoff = struct.unpack_from("<QQ", elf, 0x20)
    phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", elf, 0x36)
    end = shoff + shentsize * shnum
    for i in range(phnum):
        _, _, offset, _, _, filesz, _, _ = struct.unpack_from("<IIQQQQQQ", elf, phoff + i * phentsize)
        end = max(end, offset + filesz)
    for i in range(shnum):
        _, sh_type, _, _, offset, size = struct.unpack_from("<IIQQQQ", elf, shoff + i * shentsize)
        if sh_type != 8:  # SHT_NOBITS occupies no file space
            end = max(end, offset + size)
    return end


def has_pvh_note(elf: bytes) -> bool:
    """Whether ``elf`` carries the Xen PHYS32_ENTRY note that QEMU's PVH loader needs."""
    (phoff,) = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(phnum):
        p_type, _, offset, _, _, filesz, _, _ = struct.unpack_from("<IIQQQQQQ", elf, phoff + i * phentsize)
        if p_type != PT_NOTE:
            continue
        position, end = offset, offset + filesz
        while position + 12 <= end:
            namesz, descsz, note_type = struct.unpack_from("<III", elf, position)
            name = elf[position + 12 : position + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and note_type == XEN_ELFNOTE_PHYS32_ENTRY:
                return True
            position += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False


def extract_vmlinux(bzimage: Path, out: Path) -> str:
    """Write the ELF vmlinux inside ``bzimage`` to ``out``; returns a one-line summary."""
    compression, data = bzimage_payload(bzimage.read_bytes())
    elf = data[: elf_extent(data)]
    if not has_pvh_note(elf):
        raise BuildError("the vmlinux has no PVH entry note, so QEMU cannot boot it with -kernel")
    temporary = out.with_suffix(".tmp")
    temporary.write_bytes(elf)
    temporary.replace(out)
    return f"{compression} payload, {len(elf)} bytes ELF with PVH entry"


# --- modules ------------------------------------------------------------------


def module_name(path: str | Path) -> str:
    """The kernel's name for the module in ``path``: ``vfio-pci.ko.xz`` -> ``vfio_pci``."""
    name = Path(path).name
    return name[: name.index(".ko")].replace("-", "_")


def read_module(path: Path) -> bytes:
    """The plain ELF bytes of a possibly compressed module."""
    data = path.read_bytes()
    if path.name.endswith(".ko"):
        return data
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if path.name.endswith(".ko.gz"):
        return gzip.decompress(data)
    if path.name.endswith(".ko.zst"):
        return _zstd_decompress(data)
    raise BuildError(f"unknown module compression: {path}")


def modinfo(elf: bytes) -> dict[str, list[str]]:
    """The ``.modinfo`` section of a module as ``key -> [values]``."""
    shoff = struct.unpack_from("<Q", elf, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)

    def section(index: int) -> tuple[int, int, int]:
        name, _, _, _, offset, size = struct.unpack_from("<IIQQQQ", elf, shoff + index * shentsize)
        return name, offset, size

    _, names_offset, _ = section(shstrndx)
    for index in range(shnum):
        name, offset, size = section(index)
        end = elf.index(b"\0", names_offset + name)
        if elf[names_offset + name : end] == b".modinfo":
            info: dict[str, list[str]] = {}
            for entry in elf[offset : offset + size].split(b"\0"):
                key, sep, value = entry.decode(errors="replace").partition("=")
                if sep:
                    info.setdefault(key, []).append(value)
            return info
    return {}


def module_dependencies(info: dict[str, list[str]]) -> list[tuple[str, bool]]:
    """``(name, hard)``: hard dependencies, then ``softdep`` pre-dependencies, as kernel names."""
    names = [(d, True) for value in info.get("depends", []) for d in value.split(",") if d]
    for value in info.get("softdep", []):
        words = value.split()
        pre = False
        for word in words:
            if word.endswith(":"):
                pre = word == "pre:"
            elif pre:
                names.append((word, False))
    return [(n.replace("-", "_"), hard) for n, hard in names]


def parse_module_list(path: Path) -> list[tuple[str, bool]]:
    """``(name, required)`` pairs from a list file: one name a line, ``#`` comments, ``?`` = optional."""
    wanted = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            optional = line.endswith("?")
            wanted.append((line.rstrip("?").strip().replace("-", "_"), not optional))
    return wanted


def find_module_dir(root: Path, release: str) -> Path:
    for candidate in (root / "lib/modules" / release, root / "usr/lib/modules" / release):
        if (candidate / "kernel").is_dir():
            return candidate
    raise BuildError(f"no modules for {release} under {root} (no lib/modules/{release}/kernel)")


class ModuleSource:
    """Where a kernel's modules are: each loadable module's file by kernel name, and the built-in names."""

    def __init__(self, files: dict[str, Path], builtin: set[str], where: Path) -> None:
        self.files = files
        self.builtin = builtin
        self.where = where

    @classmethod
    def installed(cls, root: Path, release: str) -> ModuleSource:
        """``ROOT/lib/modules/REL`` (or ``usr/lib/modules``): an unpacked package or ``INSTALL_MOD_PATH``."""
        module_dir = find_module_dir(root, release)
        files = {module_name(p): p for p in (module_dir / "kernel").rglob("*.ko*")}
        return cls(files, _builtin_names(module_dir / "modules.builtin"), module_dir)

    @classmethod
    def build_tree(cls, tree: Path) -> ModuleSource:
        """A kernel build tree (the ``O=`` directory when there is one) after ``make modules``."""
        order = tree / "modules.order"
        if order.exists():
            files = {}
            for line in order.read_text().split():
                relative = line.removeprefix("kernel/")
                path = tree / (relative[: -len(".o")] + ".ko" if relative.endswith(".o") else relative)
                if path.exists():
                    files[module_name(path)] = path
        else:
            files = {module_name(p): p for p in tree.rglob("*.ko")}
        return cls(files, _builtin_names(tree / "modules.builtin"), tree)


def _builtin_names(path: Path) -> set[str]:
    return {module_name(line) for line in path.read_text().split()} if path.exists() else set()


def resolve_modules(
    source: ModuleSource, wanted: list[tuple[str, bool]], out: Path, *, optional: bool = False
) -> dict[str, list[str]]:
    """Write the closure of ``wanted`` as plain ``.ko`` files into ``out``.

    ``out/load.order`` lists the file names, dependencies first.  With
    ``optional`` every listed module may be absent (a kernel of the user's
    own); a dependency of one that is present may not.  Returns the load
    order, the listed modules built in and those absent, by name.
    """
    files, builtin = source.files, source.builtin
    order: list[str] = []
    visiting: set[str] = set()
    summary: dict[str, list[str]] = {"order": order, "builtin": [], "absent": []}

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in order or name in builtin:
            return
        if name in visiting:
            raise BuildError(f"module dependency cycle: {' -> '.join(chain + (name,))}")
        if name not in files:
            raise BuildError(f"module {name} (needed by {' -> '.join(chain) or 'the list'}) is not in {source.where}")
        visiting.add(name)
        elf = read_module(files[name])
        for dependency, hard in module_dependencies(modinfo(elf)):
            if hard or dependency in files or dependency in builtin:
                visit(dependency, chain + (name,))
            else:
                print(f"  module {dependency} (soft dependency of {name}, no such module)")
        visiting.discard(name)
        (out / f"{name}.ko").write_bytes(elf)
        order.append(name)

    out.mkdir(parents=True, exist_ok=True)
    for name, required in wanted:
        if name in builtin:
            summary["builtin"].append(name)
            print(f"  module {name} (built in)")
        elif name not in files and (optional or not required):
            summary["absent"].append(name)
            print(f"  module {name} (absent, optional)")
        else:
            visit(name, ())
    (out / "load.order").write_text("".join(f"{name}.ko\n" for name in order))
    return summary


# --- cpio ---------------------------------------------------------------------


def _newc_header(name: str, mode: int, size: int, ino: int, rdev: tuple[int, int] = (0, 0), nlink: int = 1) -> bytes:
    fields = [ino, mode, 0, 0, nlink, 0, size, 0, 0, rdev[0], rdev[1], len(name) + 1, 0]
    header = b"070701" + b"".join(b"%08X" % f for f in fields) + name.encode() + b"\0"
    return header + b"\0" * (-len(header) % 4)


def _pad(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 4)


def cpio_entries(directory: Path) -> Iterator[tuple[str, int, bytes]]:
    """``(name, mode, data)`` for everything under ``directory``, parents first, sorted."""
    for dirpath, dirnames, filenames in os.walk(directory):
        dirnames.sort()
        for name in sorted(dirnames) + sorted(filenames):
            path = Path(dirpath) / name
            relative = path.relative_to(directory).as_posix()
            info = path.lstat()
            if stat.S_ISLNK(info.st_mode):
                yield relative, stat.S_IFLNK | 0o777, os.readlink(path).encode()
            elif stat.S_ISDIR(info.st_mode):
                yield relative, stat.S_IFDIR | 0o755, b""
            elif stat.S_ISREG(info.st_mode):
                permissions = 0o755 if info.st_mode & 0o111 else 0o644
                yield relative, stat.S_IFREG | permissions, path.read_bytes()


def write_cpio(directory: Path, out: Path, nodes: Iterable[tuple[str, int, int, int]] = ()) -> None:
    """A gzip-compressed newc archive of ``directory`` plus device ``nodes`` (path, mode, major, minor)."""
    parts = []
    ino = 1
    for name, mode, data in cpio_entries(directory):
        parts.append(_newc_header(name, mode, len(data), ino) + _pad(data))
        ino += 1
    for name, mode, major, minor in nodes:
        parts.append(_newc_header(name.lstrip("/"), stat.S_IFCHR | mode, 0, ino, (major, minor)))
        ino += 1
    parts.append(_newc_header("TRAILER!!!", 0, 0, 0, nlink=1))
    archive = b"".join(parts)
    temporary = out.with_suffix(".tmp")
    with open(temporary, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6, mtime=0) as packed:
        packed.write(archive + b"\0" * (-len(archive) % 512))
    temporary.replace(out)


# --- initramfs ----------------------------------------------------------------


def build_initramfs(
    source: ModuleSource,
    wanted: list[tuple[str, bool]],
    out: Path,
    *,
    busybox: Path,
    init: Path,
    scripts: Path,
    programs: Path,
    optional: bool = False,
) -> dict[str, list[str]]:
    """The guest initramfs: busybox and its applets, ``/init``, scripts, programs and modules.

    ``scripts`` (``guest/bin``) and ``programs`` (compiled guest programs) go
    to ``/bin``; the modules and ``load.order`` to ``/lib/modules``.  Returns
    the module summary of :func:`resolve_modules`.
    """
    listing = subprocess.run([str(busybox), "--list"], capture_output=True, text=True, check=False)
    if listing.returncode != 0:
        raise BuildError(f"{busybox} --list failed: {listing.stderr.strip()}")
    with tempfile.TemporaryDirectory(prefix="initramfs.", dir=out.parent) as staging:
        stage = Path(staging)
        for directory in ("bin", "dev", "etc", "lib/modules", "proc", "sys", "tmp", "run", "vdev", "root", "usr"):
            (stage / directory).mkdir(parents=True, exist_ok=True)
        (stage / "sbin").symlink_to("bin")
        (stage / "usr/bin").symlink_to("../bin")
        (stage / "usr/sbin").symlink_to("../bin")
        shutil.copy(busybox, stage / "bin/busybox")
        for applet in listing.stdout.split():
            if applet != "busybox":
                (stage / "bin" / applet).symlink_to("busybox")
        summary = resolve_modules(source, wanted, stage / "lib/modules", optional=optional)
        shutil.copy(init, stage / "init")
        (stage / "init").chmod(0o755)
        for folder in (scripts, programs):
            for path in sorted(folder.iterdir()) if folder.is_dir() else ():
                if path.is_file() and not path.name.startswith("."):
                    shutil.copy(path, stage / "bin" / path.name)
                    (stage / "bin" / path.name).chmod(0o755)
        write_cpio(stage, out, [("/dev/console", 0o600, 5, 1)])
    return summary


# --- command line -------------------------------------------------------------


def _node(text: str) -> tuple[str, int, int, int]:
    path, mode, major, minor = text.split(":")
    return path, int(mode, 8), int(major), int(minor)


def _module_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", type=Path, help="the unpacked kernel packages (or INSTALL_MOD_PATH)")
    parser.add_argument("--release", help="the kernel release (uname -r), with --root")
    parser.add_argument("--tree", type=Path, help="a kernel build tree instead of --root")
    parser.add_argument("--list", type=Path, required=True, help="the module list file")
    parser.add_argument("--optional", action="store_true", help="every listed module may be absent")


def _module_source(args: argparse.Namespace) -> ModuleSource:
    if args.tree is not None:
        return ModuleSource.build_tree(args.tree)
    if args.root is None or args.release is None:
        raise BuildError("give --root and --release, or --tree")
    return ModuleSource.installed(args.root, args.release)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    vmlinux = commands.add_parser("vmlinux", help="extract the ELF vmlinux from a bzImage")
    vmlinux.add_argument("bzimage", type=Path)
    vmlinux.add_argument("out", type=Path)
    modules = commands.add_parser("modules", help="copy a module list's closure, decompressed")
    _module_arguments(modules)
    modules.add_argument("--out", type=Path, required=True)
    cpio = commands.add_parser("cpio", help="pack a directory as a gzip newc initramfs")
    cpio.add_argument("--dir", type=Path, required=True)
    cpio.add_argument("--out", type=Path, required=True)
    cpio.add_argument("--node", type=_node, action="append", default=[], help="PATH:MODE:MAJOR:MINOR")
    initramfs = commands.add_parser("initramfs", help="the whole guest initramfs for one kernel")
    _module_arguments(initramfs)
    initramfs.add_argument("--busybox", type=Path, required=True)
    initramfs.add_argument("--init", type=Path, required=True, help="guest/init")
    initramfs.add_argument("--scripts", type=Path, required=True, help="guest/bin")
    initramfs.add_argument("--programs", type=Path, required=True, help="the compiled guest programs")
    initramfs.add_argument("--out", type=Path, required=True)
    initramfs.add_argument("--load-order", type=Path, help="also write the module load order here")
    initramfs.add_argument("--summary", type=Path, help="write the modules loaded, built in and absent as JSON")
    args = parser.parse_args(argv)
    try:
        if args.command == "vmlinux":
            print(extract_vmlinux(args.bzimage, args.out))
        elif args.command == "modules":
            summary = resolve_modules(
                _module_source(args), parse_module_list(args.list), args.out, optional=args.optional
            )
            print(" ".join(summary["order"]))
        elif args.command == "initramfs":
            summary = build_initramfs(
                _module_source(args),
                parse_module_list(args.list),
                args.out,
                busybox=args.busybox,
                init=args.init,
                scripts=args.scripts,
                programs=args.programs,
                optional=args.optional,
            )
            if args.load_order is not None:
                args.load_order.write_text("".join(f"{name}.ko\n" for name in summary["order"]))
            if args.summary is not None:
                args.summary.write_text(json.dumps(summary) + "\n")
            print(" ".join(summary["order"]))
        else:
            write_cpio(args.dir, args.out, args.node)
    except BuildError as exc:
        print(f"artefacts.py {args.command}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
