"""The runnable example in docs/memory-enable.md passes as a user's project would run it.

Issue 15: the memory-enable API had no runnable example, and nothing said the
MEM schedules are coroutines.  The page's ``# test_memory_enable.py`` block
runs in a separate pytest process, outside vdev's configuration.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import trio

DOC = Path(__file__).resolve().parent.parent / "docs" / "memory-enable.md"


@pytest.mark.requires("libvfio-user")
async def test_the_documented_memory_enable_example_passes(tmp_path: Path) -> None:
    (code,) = re.findall(r"```python\n(# test_memory_enable\.py\n.*?)```", DOC.read_text(), flags=re.DOTALL)
    (tmp_path / "test_memory_enable.py").write_text(code)
    result = await trio.run_process(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_memory_enable.py"],
        cwd=tmp_path,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    output = result.stdout.decode()
    assert result.returncode == 0, output + result.stderr.decode()
    assert "2 passed" in output
