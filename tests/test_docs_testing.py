"""The example in docs/testing.md passes when run as a user's project would run it.

The page's files (the device and its test files, each a ``python`` block
opening with ``# name.py``) are written to a fresh directory, and each test
file runs in a separate pytest process, outside vdev's configuration: only
what vdev installs (its pytest plugin) is there.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import trio

DOC = Path(__file__).resolve().parent.parent / "docs" / "testing.md"

#: The page's test files and how many tests each has.
TEST_FILES = {
    "test_doorbell.py": 3,
    "test_doorbell_qemu.py": 2,
    "test_scripted_server.py": 1,
}


def documented_files() -> dict[str, str]:
    blocks = re.findall(r"```python\n# (\w+\.py)\n(.*?)```", DOC.read_text(), flags=re.DOTALL)
    return {name: code for name, code in blocks}


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
    result = await trio.run_process(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file],
        cwd=tmp_path,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    output = result.stdout.decode()
    assert result.returncode == 0, output + result.stderr.decode()
    assert f"{TEST_FILES[test_file]} passed" in output
