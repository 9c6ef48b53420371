"""The example in docs/testing.md passes when run as a user's project would run it.

The page's files (the device and its test files, each a ``python`` block
opening with ``# name.py``) are written to a fresh directory, and each test
file runs in a separate pytest process, outside vdev's configuration: only
what vdev installs (its pytest plugin) is there.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.documented import DOCS, assert_pytest_passes, python_blocks

#: The page's test files and how many tests each has.
TEST_FILES = {
    "test_doorbell.py": 3,
    "test_doorbell_qemu.py": 2,
    "test_scripted_server.py": 1,
}


def documented_files() -> dict[str, str]:
    return python_blocks(DOCS / "testing.md")


def test_the_page_has_the_device_and_exactly_these_test_files() -> None:
    assert set(documented_files()) == {"doorbell.py", *TEST_FILES}


@pytest.mark.parametrize(
    "test_file",
    [
        pytest.param("test_doorbell.py", id="bench"),
        pytest.param("test_scripted_server.py", id="scripted-server"),
        pytest.param("test_doorbell_qemu.py", id="qemu", marks=pytest.mark.requires("qemu", "libvfio-user")),
    ],
)
async def test_the_documented_test_file_passes(tmp_path: Path, test_file: str) -> None:
    for name, code in documented_files().items():
        (tmp_path / name).write_text(code)
    await assert_pytest_passes(tmp_path, test_file, TEST_FILES[test_file])
