"""vdev installed the way docs/testing.md says, outside the checkout, runs the page's example.

Issue 15: a non-editable install looked for ``.deps`` inside site-packages
and said "run make deps", ``VDEV_DEPS_DIR`` was documented nowhere, and the
example failed with ``No module named 'qemu'``.  This test follows the page:
``pip install '<checkout>[test]'`` (not editable) into a fresh virtual
environment, ``VDEV_DEPS_DIR`` set, the page's test files run there by that
environment's pytest.  The checkout is copied first, so the build leaves
nothing behind in it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from vdev import deps

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "testing.md"
#: What the page tells a user to run, as the test reads it back.
INSTALL = re.compile(r"^pip install '/path/to/vdev\[(?P<extra>\w+)\]'", re.MULTILINE)
SETTING = re.compile(r"^export (?P<name>VDEV_DEPS_DIR)=/path/to/vdev/\.deps", re.MULTILINE)
#: What a copy of the checkout to build from does without: environments, caches, provisioned components.
LEFT_BEHIND = (".git", ".venv", ".deps", "build", "results", "*.egg-info", "__pycache__", ".*_cache", ".hypothesis")


def documented_files() -> dict[str, str]:
    return dict(re.findall(r"```python\n# (\w+\.py)\n(.*?)```", DOC.read_text(), flags=re.DOTALL))


async def run(command: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    return await trio.run_process(command, cwd=cwd, env=env, capture_stdout=True, capture_stderr=True, check=False)


@pytest.mark.requires("qemu", "libvfio-user")
async def test_an_installed_vdev_outside_the_checkout_runs_the_documented_example(tmp_path: Path) -> None:
    page = DOC.read_text()
    install, setting = INSTALL.search(page), SETTING.search(page)
    assert install is not None and setting is not None, "docs/testing.md no longer says how to install vdev"
    source = tmp_path / "vdev-source"
    shutil.copytree(ROOT, source, symlinks=True, ignore=shutil.ignore_patterns(*LEFT_BEHIND))
    venv = tmp_path / "venv"
    assert (await run([sys.executable, "-m", "venv", str(venv)], tmp_path)).returncode == 0
    python = venv / "bin" / "python"
    with trio.fail_after(600):
        pip = await run([str(python), "-m", "pip", "install", "-q", f"{source}[{install['extra']}]"], tmp_path)
    assert pip.returncode == 0, pip.stderr.decode()[-3000:]

    project = tmp_path / "project"
    project.mkdir()
    for name, code in documented_files().items():
        (project / name).write_text(code)
    env = {key: value for key, value in os.environ.items() if not key.startswith("VDEV_")}

    unset = await run([str(venv / "bin" / "vdev"), "doctor", "--json"], project, env)
    fixes = {check["name"]: check["fix"] for check in json.loads(unset.stdout)["checks"]}
    assert unset.returncode == 1 and "set VDEV_DEPS_DIR to its .deps folder" in fixes["qemu"]

    env[setting["name"]] = str(deps.cache_dir())
    doctor = await run([str(venv / "bin" / "vdev"), "doctor"], project, env)
    assert doctor.returncode == 0, doctor.stdout.decode()
    with trio.fail_after(300):
        result = await run([str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider"], project, env)
    output = result.stdout.decode()
    assert result.returncode == 0, output + result.stderr.decode()
    tests = sum(code.count("\nasync def test_") + code.count("\ndef test_") for code in documented_files().values())
    assert re.search(rf"\b{tests} passed\b", output) and "skipped" not in output, output
    installed = await run([str(python), "-c", "import vdev; print(vdev.__file__)"], project, env)
    assert Path(installed.stdout.decode().strip()).is_relative_to(venv)  # not the checkout's copy
