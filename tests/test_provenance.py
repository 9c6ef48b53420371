"""What a recorded result says about the libvfio-user it ran with: the revision, and the patches on it."""

from __future__ import annotations

from pathlib import Path

import pytest

from vdev.provenance import collect

REVISION = "0b28d205572c80b568a1003db2c8f37ca333e4d7"


@pytest.fixture
def library(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A library laid out as ``make deps`` leaves it: ``lib/`` with ``REVISION`` next to it."""
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "libvfio-user.so.0").touch()
    (tmp_path / "REVISION").write_text(REVISION + "\n")
    monkeypatch.setenv("VDEV_LIBVFIO_USER", str(tmp_path / "lib" / "libvfio-user.so.0"))
    return tmp_path


def test_the_patch_set_make_deps_applied_is_recorded(library: Path) -> None:
    (library / "PATCHES").write_text("set 0864473827c9\nebaa33f7 0001-Send-one-fd-per-region.patch\n")
    recorded = collect().to_json()
    assert (recorded["libvfio_user_revision"], recorded["libvfio_user_patch_set"]) == (REVISION, "0864473827c9")


def test_a_library_without_a_patch_record_has_none(library: Path) -> None:
    recorded = collect().to_json()
    assert (recorded["libvfio_user_revision"], recorded["libvfio_user_patch_set"]) == (REVISION, None)
