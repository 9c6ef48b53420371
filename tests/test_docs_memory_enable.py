"""The runnable example in docs/memory-enable.md passes as a user's project would run it.

Issue 15: the memory-enable API had no runnable example, and nothing said the
MEM schedules are coroutines.  The page's ``# test_memory_enable.py`` block
runs in a separate pytest process, outside vdev's configuration.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.documented import DOCS, assert_pytest_passes, python_blocks


@pytest.mark.requires("libvfio-user")
async def test_the_documented_memory_enable_example_passes(tmp_path: Path) -> None:
    (tmp_path / "test_memory_enable.py").write_text(python_blocks(DOCS / "memory-enable.md")["test_memory_enable.py"])
    await assert_pytest_passes(tmp_path, "test_memory_enable.py", 2)
