"""The guest harness's pure parts: result lines, the appended initramfs, the command line, artefacts."""

from __future__ import annotations

import gzip
import json
import stat
from pathlib import Path

import pytest

from vdev.qemu.guest import (
    BASE_APPEND,
    GuestArtefacts,
    GuestResult,
    extra_initrd,
    guest_command,
    parse_result,
)


def test_a_result_may_follow_a_kernel_prefix_on_its_line() -> None:
    assert parse_result('[    2.5] foo VDEV {"kind": "x", "n": 1} trailing') == {"kind": "x", "n": 1}


@pytest.mark.parametrize("line", ["", "[ 1.0] vfio-pci 0000:00:03.0: enabling", "VDEV", "xVDEVICE {"])
def test_lines_without_a_result_are_none(line: str) -> None:
    assert parse_result(line) is None


@pytest.mark.parametrize("line", ['VDEV {"kind": "x", "n": [ 1.2] usb', 'VDEV {"n": 1}', 'VDEV {"kind": 3}'])
def test_broken_result_lines_raise(line: str) -> None:
    with pytest.raises(ValueError):
        parse_result(line)


def test_results_match_on_kind_and_members() -> None:
    result = GuestResult("vfio.region", {"kind": "vfio.region", "index": 0, "size": 4096}, 1.0, 7)
    assert result.matches("vfio.region", {"index": 0})
    assert not result.matches("vfio.region", {"index": 1})
    assert not result.matches("vfio.region", {"missing": None})
    assert not result.matches("vfio.irq", {})
    assert result["size"] == 4096


def read_newc(archive: bytes) -> dict[str, tuple[int, bytes]]:
    """name -> (mode, data) of a newc archive, up to its trailer."""
    entries = {}
    position = 0
    while True:
        assert archive[position : position + 6] == b"070701"
        fields = [int(archive[position + 6 + 8 * i : position + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        name_start = position + 110
        name = archive[name_start : name_start + namesize - 1].decode()
        data_start = name_start + namesize + (-(110 + namesize) % 4)
        if name == "TRAILER!!!":
            return entries
        entries[name] = (mode, archive[data_start : data_start + size])
        position = data_start + size + (-size % 4)


def test_the_appended_initramfs_holds_the_files_and_their_directories() -> None:
    archive = read_newc(gzip.decompress(extra_initrd({"/vdev/run": b"pci-list\n", "/opt/a/b.sh": b"#!/bin/sh\n"})))
    assert archive["vdev/run"] == (stat.S_IFREG | 0o755, b"pci-list\n")
    assert archive["opt/a/b.sh"] == (stat.S_IFREG | 0o755, b"#!/bin/sh\n")
    assert archive["opt"][0] == archive["opt/a"][0] == stat.S_IFDIR | 0o755
    assert list(archive).index("opt/a") < list(archive).index("opt/a/b.sh")


def test_the_command_line_has_an_iommu_shared_ram_and_the_console_on_stdout() -> None:
    command = guest_command(
        "qemu",
        kernel=Path("/k"),
        initrd=Path("/i"),
        append=BASE_APPEND,
        memory=256 << 20,
        devices=[{"driver": "vfio-user-pci", "socket": {"type": "unix", "path": "/s"}}],
    )
    joined = " ".join(command)
    assert "-device intel-iommu,caching-mode=on,intremap=on" in joined
    assert "share=on" in joined and "memory-backend=" in joined
    assert "-serial chardev:console" in joined and "stdio,id=console" in joined
    assert command[command.index("-append") + 1] == BASE_APPEND
    assert json.loads(command[-1])["driver"] == "vfio-user-pci"
    with pytest.raises(ValueError):
        guest_command("qemu", kernel=Path("/k"), initrd=Path("/i"), append="", memory=1000)


def test_missing_artefacts_name_the_command_that_builds_them(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="`make guest`"):
        GuestArtefacts.find(directory=tmp_path)
    with pytest.raises(FileNotFoundError, match='`make guest KERNELS="sid"`'):
        GuestArtefacts.find("sid", directory=tmp_path)


def test_artefacts_come_from_the_manifest(tmp_path: Path) -> None:
    where = tmp_path / "trixie"
    where.mkdir()
    (where / "initramfs.cpio.gz").write_bytes(b"")
    manifest = {"kernel": "vmlinux", "release": "6.12.1", "package_version": "6.12.1-1", "modules": ["vfio"]}
    (where / "kernel.json").write_text(json.dumps(manifest))
    artefacts = GuestArtefacts.find("trixie", directory=tmp_path)
    assert artefacts.kernel == where / "vmlinux"
    assert artefacts.initrd == where / "initramfs.cpio.gz"
    assert (artefacts.release, artefacts.modules) == ("6.12.1", ("vfio",))
