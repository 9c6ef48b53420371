"""Kernel modules rebuilt with a patch, for a Debian guest kernel: ``vdev guest --patch FILE.diff``.

A kernel engineer's change to vfio-pci is a patch against the kernel tree.
To test it in Debian's kernel without building a kernel, the modules the
patch touches are built out of tree, from Debian's own packages at the
image's exact version:

* ``linux-source-<major.minor>`` (the patched source Debian builds from),
  of which only the directories the patch touches are unpacked: the
  tarball lists each directory's contents together and is compressed in
  blocks, so a multi-threaded ``xz`` stream read stops right after them;
* ``linux-headers-<release>`` with the ``-common`` headers and
  ``linux-kbuild`` it depends on, unpacked (not installed).  The
  ``-<flavour>`` half includes the ``-common`` half's Makefile by an
  absolute ``/usr/src`` path, which is made relative to the unpacked copy.

Then ``patch -p1`` and ``make -C <headers> M=<directory> modules`` per
directory, with the compiler the headers name (``gcc-12`` for 6.1).  The
modules the patch touches are those whose objects' dependency lists
(kbuild's ``.cmd`` files) name a changed file; only those replace the
guest's stock modules.  Anything that is not a module (a header under
``include/``, code built into the kernel) cannot be changed this way: boot a
kernel of your own build instead (``--kernel PATH``).

In the guest, a rebuilt module is a second cpio archive appended to the
set's initramfs with the ``.ko`` at the stock module's path: the kernel
unpacks concatenated archives in order, so the later file wins.  The result
loads in the stock kernel: its vermagic and every symbol CRC match, and
the kernel is tainted ``OE`` (out of tree, unsigned) without refusing it.

Everything is cached under :func:`vdev.deps.kernel_build_dir`: the Debian
packages by kernel package and version (``debian/``), the modules by kernel
package and version and the patch's SHA-256 (``modules/``).  Building is
serialised by a lock per cache entry.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import tarfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from vdev import deps
from vdev.guest.errors import ModuleBuildError
from vdev.qemu.guest import GuestArtefacts, extra_initrd, guest_dir

Progress = Callable[[str], None]

#: Where a patch's changes cannot be rebuilt out of tree (they come from the headers package).
_NOT_MODULES = ("include/", "arch/x86/include/", "scripts/", "tools/")
_LOG_LINES = 25


@dataclass(frozen=True)
class PatchedModules:
    """Modules built with a patch for one Debian kernel package, ready to replace the stock ones."""

    #: The patch file.
    patch: Path
    #: Its SHA-256 (hex).
    sha256: str
    #: The kernel image package and version they were built for.
    kernel_package: str
    kernel_version: str
    #: The files the patch changes (relative to the tree's top).
    touched: tuple[str, ...]
    #: Kernel module name (``vfio_pci_core``) -> the ``.ko`` built with the patch.
    modules: Mapping[str, Path]
    #: The Debian packages they were built from, as ``name=version``.
    built_from: tuple[str, ...]
    #: The cache entry (sources as patched, objects, ``build.log``, ``manifest.json``).
    directory: Path
    #: Whether this came from the cache.
    cached: bool


def patch_files(text: str) -> list[str]:
    """The files a unified diff changes, relative to the tree's top (its paths carry one prefix: ``-p1``).

    >>> patch_files("--- a/drivers/x.c\\n+++ b/drivers/x.c\\n@@ -1 +1 @@\\n-a\\n+b\\n")
    ['drivers/x.c']
    """
    files: list[str] = []
    lines = text.splitlines()
    # A header is a "--- " line followed by a "+++ " line; inside a hunk that pair cannot occur
    # (a removed line is never directly followed by an added one starting with "++").
    for old, new in zip(lines, lines[1:]):
        if not (old.startswith("--- ") and new.startswith("+++ ")):
            continue
        before, after = (line[4:].split("\t")[0].strip() for line in (old, new))
        name = before if after == "/dev/null" else after
        _, slash, relative = name.partition("/")
        if not slash or not relative or relative.startswith("/") or ".." in Path(relative).parts:
            raise ModuleBuildError(f"the patch names {name!r}: paths must be a/<path> and b/<path> (patch -p1)")
        if relative not in files:
            files.append(relative)
    return files


def build_patched_modules(
    artefacts: GuestArtefacts, patch: str | os.PathLike[str], *, progress: Progress | None = None
) -> PatchedModules:
    """The modules ``patch`` touches, built for ``artefacts``' kernel (from the cache when they were built before)."""
    say = progress or (lambda line: None)
    patch = Path(patch)
    try:
        data = patch.read_bytes()
    except OSError as exc:
        raise ModuleBuildError(f"cannot read the patch {patch}: {exc.strerror}") from None
    if artefacts.package is None or artefacts.package_version is None:
        raise ModuleBuildError(
            f"--patch needs a Debian kernel set (its package names the source to build); "
            f"{artefacts.name} is a kernel of your own: apply the patch to its tree and rebuild it"
        )
    touched = patch_files(data.decode(errors="replace"))
    if not touched:
        raise ModuleBuildError(f"{patch} changes no file (not a unified diff?)")
    outside = [name for name in touched if name.startswith(_NOT_MODULES) or "/" not in name]
    if outside:
        raise ModuleBuildError(
            f"{patch} changes {', '.join(outside)}, which out-of-tree module builds take from Debian's headers "
            "package: boot a kernel of your own build instead (--kernel PATH)"
        )
    sha256 = hashlib.sha256(data).hexdigest()
    cache = deps.kernel_build_dir().resolve()
    entry = cache / "modules" / f"{artefacts.package}_{artefacts.package_version}" / sha256[:16]
    entry.parent.mkdir(parents=True, exist_ok=True)
    with _locked(entry):
        cached = _load_manifest(entry, patch)
        if cached is not None:
            say(f"patched modules {', '.join(cached.modules)} from the cache ({entry})")
            return cached
        started = time.monotonic()
        packages = _DebianKernel.provision(artefacts, say)
        built = _build(packages, patch, touched, entry, say)
        manifest = {
            "patch": patch.name,
            "sha256": sha256,
            "kernel_package": artefacts.package,
            "kernel_version": artefacts.package_version,
            "release": artefacts.release,
            "touched": touched,
            "modules": {name: str(path.relative_to(entry)) for name, path in built.items()},
            "built_from": list(packages.built_from),
            "build_seconds": round(time.monotonic() - started, 1),
        }
        (entry / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        say(f"built {', '.join(built)} with {patch.name} in {manifest['build_seconds']} s (cached in {entry})")
    result = _load_manifest(entry, patch)
    assert result is not None
    return dataclasses.replace(result, cached=False)


def with_patched_modules(
    artefacts: GuestArtefacts, modules: PatchedModules, *, progress: Progress | None = None
) -> GuestArtefacts:
    """``artefacts`` with an initramfs whose copies of ``modules`` replace the stock ones.

    Only modules the guest loads are put in; a patch touching none of them
    is a :class:`ModuleBuildError`.
    """
    say = progress or (lambda line: None)
    loaded = [name for name in modules.modules if name in artefacts.modules]
    unused = [name for name in modules.modules if name not in artefacts.modules]
    if not loaded:
        raise ModuleBuildError(
            f"{modules.patch.name} changes {', '.join(modules.modules)}, which the guest does not load "
            f"(it loads {', '.join(artefacts.modules)}; guest/modules lists them)"
        )
    if unused:
        say(f"not loaded by the guest, left out: {', '.join(unused)}")
    files = {f"/lib/modules/{name}.ko": modules.modules[name].read_bytes() for name in loaded}
    initrd = modules.directory / f"initramfs-{artefacts.name}.cpio.gz"
    temporary = initrd.with_name(f"{initrd.name}.{os.getpid()}")
    temporary.write_bytes(artefacts.initrd.read_bytes() + extra_initrd(files))
    temporary.replace(initrd)
    return dataclasses.replace(artefacts, initrd=initrd, patch=modules.patch.name, patch_sha256=modules.sha256)


def patched(
    artefacts: GuestArtefacts, patch: str | os.PathLike[str], *, progress: Progress | None = None
) -> GuestArtefacts:
    """:func:`build_patched_modules` then :func:`with_patched_modules`: the kernel set with the patch's modules."""
    modules = build_patched_modules(artefacts, patch, progress=progress)
    return with_patched_modules(artefacts, modules, progress=progress)


# -- the cache ----------------------------------------------------------------------------


@contextmanager
def _locked(entry: Path) -> Iterator[None]:
    with open(entry.with_name(entry.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _load_manifest(entry: Path, patch: Path) -> PatchedModules | None:
    try:
        manifest = json.loads((entry / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    modules = {name: entry / relative for name, relative in manifest["modules"].items()}
    if not all(path.is_file() for path in modules.values()):
        return None
    return PatchedModules(
        patch=patch,
        sha256=manifest["sha256"],
        kernel_package=manifest["kernel_package"],
        kernel_version=manifest["kernel_version"],
        touched=tuple(manifest["touched"]),
        modules=modules,
        built_from=tuple(manifest["built_from"]),
        directory=entry,
        cached=True,
    )


# -- Debian's packages --------------------------------------------------------------------


class _Apt:
    """The host's apt, or the private one ``make deps`` configured (for kernels the host's suite lacks).

    Only asked, never updated: the kernel set was resolved from these lists,
    so its headers and source are in them unless the archive dropped the
    version since (then updating would not bring it back).
    """

    def __init__(self, name: str, config: Path | None) -> None:
        self.name = name
        self.config = config

    def _run(self, tool: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ)
        if self.config is not None:
            env["APT_CONFIG"] = str(self.config)
        try:
            return subprocess.run([tool, *args], capture_output=True, text=True, env=env, cwd=cwd, check=False)
        except FileNotFoundError:
            raise ModuleBuildError(f"building patched modules needs {tool} (a Debian host)") from None

    def records(self, names: Sequence[str], version: str) -> dict[str, dict[str, str]]:
        """Package name -> its fields, for each of ``names`` this apt has at ``version`` (one query for all)."""
        shown = self._run("apt-cache", "show", *(f"{name}={version}" for name in names)).stdout
        found: dict[str, dict[str, str]] = {}
        for stanza in shown.split("\n\n"):
            fields = dict(line.split(": ", 1) for line in stanza.splitlines() if ": " in line and line[0] != " ")
            if fields.get("Package") in names and fields.get("Version") == version:
                found[fields["Package"]] = fields
        return found

    def versions(self, package: str) -> list[str]:
        listed = self._run("apt-cache", "madison", package).stdout
        return [row.split("|")[1].strip() for row in listed.splitlines() if row.count("|") >= 2]

    def download(self, specs: Sequence[str], into: Path) -> None:
        done = self._run("apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", *specs, cwd=into)
        if done.returncode != 0:
            reason = (done.stderr.strip().splitlines() or [f"status {done.returncode}"])[-1]
            raise ModuleBuildError(f"apt-get download {' '.join(specs)} failed: {reason}")


def _apts() -> list[_Apt]:
    apts = [_Apt("the host's apt", None)]
    private = deps.cache_dir() / "apt" / "apt.conf"
    if private.is_file():
        apts.append(_Apt("the private apt of `make deps`", private))
    return apts


@dataclass(frozen=True)
class _DebianKernel:
    """Debian's source and headers for one kernel package, unpacked in the cache."""

    #: The unpacked headers (``.../usr/src/linux-headers-<release>``), ready for ``make -C``.
    headers: Path
    #: ``linux-source-<major.minor>.tar.xz``.
    tarball: Path
    #: The compiler the headers build with (``gcc-12``).
    compiler: str
    built_from: tuple[str, ...]
    #: The cache entry; ``source/`` in it holds the directories unpacked so far, unpatched.
    where: Path

    def sources(self, directories: Sequence[str], say: Progress) -> Path:
        """The unpatched source tree's top, with ``directories`` in it (unpacked once, for every patch)."""
        pristine = self.where / "source"
        top = pristine / self.tarball.name.removesuffix(".tar.xz")
        with _locked(self.where):
            missing = [d for d in directories if not (pristine / f".{d.replace('/', '+')}.done").exists()]
            if missing:
                started = time.monotonic()
                for directory in missing:
                    shutil.rmtree(top / directory, ignore_errors=True)
                found = extract_directories(self.tarball, missing, pristine)
                if pristine / found != top:
                    raise ModuleBuildError(f"{self.tarball.name} unpacks into {found}/, not {top.name}/")
                for directory in missing:
                    (pristine / f".{directory.replace('/', '+')}.done").touch()
                elapsed = time.monotonic() - started
                say(f"unpacked {', '.join(missing)} from {self.tarball.name} in {elapsed:.1f} s")
        return top

    @classmethod
    def provision(cls, artefacts: GuestArtefacts, say: Progress) -> _DebianKernel:
        version = artefacts.package_version
        assert version is not None
        series = re.match(r"\d+\.\d+", version)
        if series is None:
            raise ModuleBuildError(f"cannot tell the kernel series from the package version {version}")
        source = f"linux-source-{series.group()}"
        headers = f"linux-headers-{artefacts.release}"
        where = deps.kernel_build_dir() / "debian" / f"{artefacts.package}_{version}"
        where.parent.mkdir(parents=True, exist_ok=True)
        with _locked(where):
            manifest = where / "packages.json"
            if not manifest.is_file():
                refresh = f'remove {guest_dir() / artefacts.name} and run `make guest KERNELS="{artefacts.name}"`'
                cls._download(where, version, source, headers, refresh, say)
            recorded = json.loads(manifest.read_text())
        headers_dir = where / "root" / "usr" / "src" / headers
        variables = (
            (headers_dir / ".kernelvariables").read_text() if (headers_dir / ".kernelvariables").exists() else ""
        )
        compiler = re.search(r"\b(gcc-\d+)\b", variables)
        name = compiler.group(1) if compiler else "gcc"
        if shutil.which(name) is None:
            raise ModuleBuildError(f"{headers} builds with {name}, which this host lacks (apt-get install {name})")
        return cls(headers_dir, where / f"{source}.tar.xz", name, tuple(recorded["packages"]), where)

    @staticmethod
    def _download(where: Path, version: str, source: str, headers: str, refresh: str, say: Progress) -> None:
        found = _find_apt(headers, version)
        if found is None:
            offered = sorted({v for candidate in _apts() for v in candidate.versions(headers)}) or ["none"]
            raise ModuleBuildError(
                f"Debian's archive (as apt sees it) has no {headers} {version} to build modules against "
                f"(it has: {', '.join(offered)}); to follow the archive, {refresh}"
            )
        apt, record = found
        alternatives = re.split(r"[,|]", record.get("Depends", ""))
        needed = [source] + [
            name
            for name in (alternative.split()[0] for alternative in alternatives if alternative.strip())
            if name.startswith(("linux-headers-", "linux-kbuild-"))
        ]
        present = apt.records(needed, version)
        for name in needed:
            if name not in present:
                available = ", ".join(apt.versions(name)) or "none"
                raise ModuleBuildError(
                    f"{apt.name} has {headers} {version} but no {name} {version} (it has: {available})"
                )
        specs = [f"{name}={version}" for name in [*needed, headers]]
        shutil.rmtree(where, ignore_errors=True)
        debs = where / "debs"
        debs.mkdir(parents=True)
        started = time.monotonic()
        say(f"downloading {', '.join(specs)} ({apt.name})")
        apt.download(specs, debs)
        size = sum(path.stat().st_size for path in debs.iterdir())
        say(f"downloaded {size / 1e6:.0f} MB in {time.monotonic() - started:.1f} s; unpacking the headers")
        for deb in sorted(debs.glob("*.deb")):
            if deb.name.startswith(f"{source}_"):
                _unpack_member(deb, f"./usr/src/{source}.tar.xz", where / f"{source}.tar.xz")
            else:
                _dpkg_deb("-x", str(deb), str(where / "root"))
        makefile = where / "root" / "usr" / "src" / headers / "Makefile"
        # make -C runs in the headers directory, next to the -common half: a relative include survives a moved cache.
        makefile.write_text(makefile.read_text().replace("include /usr/src/", "include ../"))
        shutil.rmtree(debs)
        (where / "packages.json").write_text(json.dumps({"packages": specs, "download_bytes": size}) + "\n")


def _find_apt(headers: str, version: str) -> tuple[_Apt, dict[str, str]] | None:
    """The first apt that has ``headers`` at ``version``, and that package's record."""
    for apt in _apts():
        record = apt.records([headers], version).get(headers)
        if record is not None:
            return apt, record
    return None


def _dpkg_deb(*args: str) -> None:
    try:
        done = subprocess.run(["dpkg-deb", *args], capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise ModuleBuildError("building patched modules needs dpkg-deb (a Debian host)") from None
    if done.returncode != 0:
        raise ModuleBuildError(f"dpkg-deb {' '.join(args)} failed: {done.stderr.strip()}")


def _unpack_member(deb: Path, member: str, out: Path) -> None:
    """One file of a ``.deb``'s data, without unpacking the rest."""
    process = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
    assert process.stdout is not None
    try:
        with tarfile.open(fileobj=process.stdout, mode="r|") as archive:
            for info in archive:
                if info.name == member:
                    extracted = archive.extractfile(info)
                    assert extracted is not None
                    with open(out, "wb") as file:
                        shutil.copyfileobj(extracted, file, 1 << 20)
                    return
    finally:
        process.kill()
        process.wait()
    raise ModuleBuildError(f"{deb.name} holds no {member}")


def extract_directories(tarball: Path, directories: Sequence[str], out: Path) -> str:
    """Unpack ``directories`` (relative to the tree's top) from a kernel source tarball into ``out``.

    Returns the tarball's top directory (``linux-source-6.1``).  The read
    stops once every directory has been passed, which relies on each
    directory's entries being listed together (true of Debian's tarballs).
    """
    process = subprocess.Popen(["xz", "-dc", "-T0", str(tarball)], stdout=subprocess.PIPE)
    assert process.stdout is not None
    top = ""
    state = dict.fromkeys(directories, "unseen")
    try:
        with tarfile.open(fileobj=process.stdout, mode="r|") as archive:
            for info in archive:
                top = top or info.name.split("/")[0]
                relative = info.name.partition("/")[2]
                for directory, seen in state.items():
                    inside = relative == directory or relative.startswith(directory + "/")
                    if inside:
                        state[directory] = "inside"
                        archive.extract(info, out, filter="data")
                    elif seen == "inside":
                        state[directory] = "passed"
                if all(seen == "passed" for seen in state.values()):
                    break
    finally:
        process.kill()
        process.wait()
    missing = [directory for directory, seen in state.items() if seen == "unseen"]
    if missing:
        raise ModuleBuildError(f"{tarball.name} has no {', '.join(missing)}")
    return top


# -- the build ----------------------------------------------------------------------------


def _build(packages: _DebianKernel, patch: Path, touched: Sequence[str], entry: Path, say: Progress) -> dict[str, Path]:
    directories = sorted({str(Path(name).parent) for name in touched})
    # A directory's build descends into its subdirectories: build only the outermost.
    directories = [d for d in directories if not any(d.startswith(other + "/") for other in directories)]
    pristine = packages.sources(directories, say)
    shutil.rmtree(entry, ignore_errors=True)
    tree = entry / "src" / pristine.name
    for directory in directories:
        shutil.copytree(pristine / directory, tree / directory, symlinks=True)
    log = entry / "build.log"
    applied = _run_logged(
        [
            "patch",
            "-p1",
            "--batch",
            "--forward",
            "--no-backup-if-mismatch",
            "-d",
            str(tree),
            "-i",
            str(patch.resolve()),
        ],
        log,
    )
    if applied != 0:
        raise ModuleBuildError(
            f"{patch} does not apply to {packages.tarball.name.removesuffix('.tar.xz')} "
            f"({packages.built_from[0]}):\n{_tail(log)}"
        )
    jobs = str(os.cpu_count() or 1)
    started = time.monotonic()
    for directory in directories:
        say(f"building {directory} against {packages.headers.name} ({packages.compiler}, -j{jobs})")
        command = ["make", "-C", str(packages.headers), f"M={tree / directory}", f"-j{jobs}", "modules"]
        if _run_logged(command, log) != 0:
            raise ModuleBuildError(f"building {directory} with {patch.name} failed (log: {log}):\n{_tail(log)}")
    built = _touched_modules(tree, directories, [tree / name for name in touched])
    if not built:
        raise ModuleBuildError(
            f"{patch.name} changes {', '.join(touched)}, but no module built from {', '.join(directories)} "
            "uses them (built into the kernel?): boot a kernel of your own build instead (--kernel PATH)"
        )
    kept = entry / "ko"
    kept.mkdir()
    result = {}
    for name, ko in built.items():
        result[name] = kept / f"{name}.ko"
        shutil.copy(ko, result[name])
    say(f"compiled in {time.monotonic() - started:.1f} s; the patch touches {', '.join(result)}")
    return result


def _touched_modules(tree: Path, directories: Sequence[str], changed: Sequence[Path]) -> dict[str, Path]:
    """Module name -> ``.ko`` for each module built in ``directories`` with an object depending on a changed file."""
    # A changed file's absolute path, as kbuild writes it into an object's dependency list.
    uses = re.compile("|".join(re.escape(str(path)) + r"(?=[\s\\)]|$)" for path in changed), re.MULTILINE)
    touched: dict[str, Path] = {}
    for directory in directories:
        order = tree / directory / "modules.order"
        for line in order.read_text().split() if order.exists() else []:
            ko = Path(line) if Path(line).is_absolute() else tree / directory / line
            ko = ko.with_suffix(".ko")
            mod = ko.with_suffix(".mod")
            objects = mod.read_text().split() if mod.exists() else []
            for obj in objects:
                obj_path = Path(obj) if Path(obj).is_absolute() else tree / directory / obj
                cmd = obj_path.with_name(f".{obj_path.name}.cmd")
                text = cmd.read_text(errors="replace") if cmd.exists() else ""
                if uses.search(text):
                    touched[ko.name.removesuffix(".ko").replace("-", "_")] = ko
                    break
    return touched


def _run_logged(command: Sequence[str], log: Path) -> int:
    with open(log, "a") as output:
        output.write(f"$ {' '.join(command)}\n")
        output.flush()
        try:
            return subprocess.run(command, stdout=output, stderr=subprocess.STDOUT, check=False).returncode
        except FileNotFoundError:
            raise ModuleBuildError(f"building patched modules needs {command[0]} on the host") from None


def _tail(log: Path) -> str:
    lines = log.read_text(errors="replace").splitlines()
    errors = [line for line in lines if re.search(r"\berror\b|FAILED|Hunk|can't find file", line)]
    return "\n".join((errors or lines)[-_LOG_LINES:])
