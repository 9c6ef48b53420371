"""Every example in examples/ runs as README documents it, and prints what it promises."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import pytest

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.requires("qemu", "libvfio-user")


def run_example(*args: str) -> str:
    result = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_demo_prints_what_qemu_saw() -> None:
    output = run_example("examples/demo.py")
    assert "QEMU sees PCI device 1b36:0f00" in output
    assert "read  BAR0+0x00 (id)      -> 0x48454c4f" in output
    assert "read  BAR0+0x04 (scratch) -> 0xdeadbeef" in output


def test_edu_from_the_python_client() -> None:
    output = run_example("examples/edu_client.py")
    assert "edu identification: 0x010000ed" in output
    assert "10! = 3628800" in output
    assert 'b"hello from the client\'s memory"' in output


def test_edu_factorial_in_qemu_with_an_interrupt() -> None:
    output = run_example("examples/edu_qemu_factorial.py", "5")
    assert "5! mod 2**32 = 120" in output and "INTx lowered" in output


def test_mse_first_touch_experiment_writes_a_plot(tmp_path: Path) -> None:
    plot = tmp_path / "plot.png"
    output = run_example("examples/mse_first_touch.py", "--rounds", "1", "--plot", str(plot))
    assert "lazy      never written" in output and "populate  never written" in output
    assert plot.read_bytes().startswith(b"\x89PNG")


def test_write_your_own_device_is_short_and_serves(vdev_socket_dir: Path) -> None:
    assert len((REPO / "examples/my_device.py").read_text().splitlines()) < 30
    socket = vdev_socket_dir / "t.sock"
    env = {**os.environ, "PYTHONPATH": str(REPO / "examples")}
    server = subprocess.Popen(
        [sys.executable, "-m", "vdev", "serve", "my_device:Thermometer", "--socket-path", str(socket)], env=env
    )
    try:
        deadline = time.monotonic() + 20
        while not socket.exists():
            assert server.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        report = subprocess.run(
            [sys.executable, "-m", "vdev", "inspect", str(socket)], capture_output=True, text=True, timeout=60
        )
        assert report.stdout.startswith("1b36:7e70") and "MSI: vectors=1" in report.stdout
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=10)


def test_guest_shell_boots_the_guest_with_a_shell_and_the_device(
    vdev_socket_dir: Path, missing: Callable[[str], NoReturn]
) -> None:
    """Issue 15: ``vdev.shell=1`` was known only to guest/README.md; the example makes it one command."""
    from vdev.qemu import GuestArtefacts

    try:
        guest = GuestArtefacts.find()
    except FileNotFoundError as exc:
        missing(str(exc))
    socket = vdev_socket_dir / "hello.sock"
    printed = shlex.split(run_example("examples/guest_shell.py", "--print", str(socket)))
    append = printed[printed.index("-append") + 1].split()
    assert "vdev.shell=1" in append and "console=ttyS0" in append
    assert printed[printed.index("-kernel") + 1] == str(guest.kernel)
    assert json.loads(printed[printed.index("-device", printed.index("-append")) + 1])["socket"]["path"] == str(socket)
