"""The complete test file in docs/testing.md passes when run as a user's project would run it."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import trio

DOC = Path(__file__).resolve().parent.parent / "docs" / "testing.md"


@pytest.mark.requires("qemu", "libvfio-user")
async def test_the_documented_user_test_file_passes(tmp_path: Path) -> None:
    (code,) = re.findall(r"```python\n(# test_doorbell.py\n.*?)```", DOC.read_text(), flags=re.DOTALL)
    (tmp_path / "test_doorbell.py").write_text(code)
    result = await trio.run_process(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_doorbell.py"],
        cwd=tmp_path,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    output = result.stdout.decode()
    assert result.returncode == 0, output + result.stderr.decode()
    assert "2 passed" in output
