"""Running a page's example the way a user's project would: its files in a fresh directory, pytest in a child.

The docs tests share this so that "the example passes" means the same thing
for every page: a separate pytest process, outside vdev's own test
configuration, where only what vdev installs (its pytest plugin) is present.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import trio

DOCS = Path(__file__).resolve().parent.parent / "docs"


def python_blocks(page: Path) -> dict[str, str]:
    """The page's ``python`` code blocks that open with a ``# name.py`` line, by file name."""
    blocks = re.findall(r"```python\n(# (\w+\.py)\n.*?)```", page.read_text(), flags=re.DOTALL)
    return {name: code for code, name in blocks}


async def assert_pytest_passes(directory: Path, test_file: str, passed: int, *options: str) -> None:
    """Run ``test_file`` in ``directory`` with a fresh pytest; exactly ``passed`` tests must pass."""
    result = await trio.run_process(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *options, test_file],
        cwd=directory,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    output = result.stdout.decode()
    assert result.returncode == 0, output + result.stderr.decode()
    assert f"{passed} passed" in output, output
