"""The ``vdev`` command as a person uses it: serve, trace, devices, doctor, and bad arguments."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vdev.qemu import QemuMachine
from vdev.testing import vfio_user_pci

VDEV = [sys.executable, "-m", "vdev"]


def run_vdev(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*VDEV, *args], capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["serve", "nosuchdevice", "--socket-path", "/tmp/x.sock"], "no device named 'nosuchdevice'"),
        (["serve", "hello", "--socket-path", "/tmp/x.sock", "--param", "nope=1"], "has no parameter 'nope'"),
        (["serve", "hello", "--socket-path", "/tmp/x.sock", "--param", "ident"], "expects name=value"),
        (["serve", "hello", "--socket-path", "/tmp/x.sock", "--param", "ident=zz"], "bad value for ident"),
        (["serve", "hello"], "--socket-path"),
        (["serve", "no.such.module:Thing", "--socket-path", "/tmp/x.sock"], "cannot load"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_arguments_get_one_line_and_status_2(args: list[str], message: str) -> None:
    result = run_vdev(*args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and lines[0].startswith("vdev: error:")


def test_serve_refuses_to_replace_a_file(tmp_path: Path) -> None:
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    result = run_vdev("serve", "hello", "--socket-path", str(precious))
    assert result.returncode == 1 and "not a socket" in result.stderr
    assert precious.read_text() == "keep me"


def test_devices_lists_bundled_devices_with_parameters() -> None:
    listing = json.loads(run_vdev("devices", "--json").stdout)
    hello = next(entry for entry in listing if entry["name"] == "hello")
    assert hello["id"] == "1b36:0f00"
    assert [p["name"] for p in hello["parameters"]] == ["ident"]


@pytest.mark.requires("qemu", "libvfio-user")
def test_doctor_reports_components() -> None:
    result = run_vdev("doctor", "--json")
    report = json.loads(result.stdout)
    assert result.returncode == 0 and report["ok"]
    checks = {check["name"]: check for check in report["checks"]}
    assert checks["libvfio-user"]["details"]["revision"]
    assert checks["qemu"]["details"]["vfio-user-pci"] is True


def test_doctor_names_the_fix_when_something_is_missing(tmp_path: Path) -> None:
    env = {**os.environ, "VDEV_QEMU": str(tmp_path / "missing-qemu"), "VDEV_LIBVFIO_USER": str(tmp_path / "no.so")}
    result = subprocess.run([*VDEV, "doctor"], capture_output=True, text=True, env=env, timeout=60, check=False)
    assert result.returncode == 1
    assert result.stdout.count("fix: run `make deps`") == 2


def wait_for_socket(path: Path, process: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 20
    while not path.exists():
        assert process.poll() is None, process.stderr.read() if process.stderr else ""
        assert time.monotonic() < deadline, "vdev serve did not create its socket"
        time.sleep(0.05)


@pytest.mark.requires("qemu", "libvfio-user")
async def test_serve_traces_what_qemu_does_and_stops_cleanly_on_sigterm(vdev_socket_dir: Path) -> None:
    socket = vdev_socket_dir / "hello.sock"
    trace = vdev_socket_dir / "trace.jsonl"
    server = subprocess.Popen(  # noqa: ASYNC220 - a server living across the whole test, not awaited
        [*VDEV, "serve", "hello", "--socket-path", str(socket), "--trace", str(trace)],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_socket(socket, server)
        assert socket.stat().st_mode & 0o777 == 0o600
        async with QemuMachine(devices=[vfio_user_pci(socket)]) as vm:
            function = await (await vm.pci_bus()).find(0x1B36, 0x0F00)
            await function.map_bars()
            await function.enable(memory=True, io=False, master=False)
            await function.bar_writel(0, 0x04, 0x77)
            assert await function.bar_readl(0, 0x04) == 0x77
            server.send_signal(signal.SIGTERM)
            assert server.wait(timeout=10) == 0
    finally:
        if server.poll() is None:
            server.kill()
    assert not socket.exists()
    events = [json.loads(line) for line in trace.read_text().splitlines()]
    kinds = {event["kind"] for event in events}
    assert {"connect", "config_write", "command", "region_read", "region_write", "reset"} <= kinds
    command = next(event for event in events if event["kind"] == "command" and event["memory"])
    assert command["new"] & 0x2 and command["master"] is False
    write = next(event for event in events if event["kind"] == "region_write")
    assert (write["region"], write["offset"], write["size"], write["value"]) == (0, 4, 4, 0x77)
    assert all(isinstance(event["t"], float) for event in events)
