"""The ``vdev`` command as a person uses it: serve, trace, devices, doctor, and bad arguments."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vdev import deps
from vdev.qemu import QemuMachine
from vdev.testing import vfio_user_pci

VDEV = [sys.executable, "-m", "vdev"]
PATCHES = Path(__file__).parent.parent / "tools" / "libvfio-user-patches"
RECORD = deps.libvfio_user_patches_file()


def run_vdev(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*VDEV, *args], capture_output=True, text=True, timeout=60, check=False, cwd=cwd)


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """The single ``vdev: error:`` line of a run that must have failed with status 2."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("vdev: error:"), result.stderr
    return lines[0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["serve", "nosuchdevice", "--socket-path", "/tmp/x.sock"], "no device named 'nosuchdevice'"),
        (["serve", "hello", "--socket-path", "/tmp/x.sock", "--param", "nope=1"], "has no parameter 'nope'"),
        (["serve", "hello", "--socket-path", "/tmp/x.sock", "--param", "ident"], "expects name=value"),
        (
            ["serve", "hello", "--socket-path", "/tmp/x.sock", "--param", "ident=zz"],
            "Hello: bad value for --param ident=zz: expected an integer (42, 0x2a, 0o52 or 0b101010), got 'zz'",
        ),
        (
            ["serve", "nvme", "--socket-path", "/tmp/x.sock", "--param", "interrupts=msx"],
            "Nvme: bad value for --param interrupts=msx: interrupts: one of",
        ),
        (
            ["serve", "membar", "--socket-path", "/tmp/x.sock", "--param", "split_bar4=maybe"],
            "MemBar: bad value for --param split_bar4=maybe: expected a boolean",
        ),
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
    assert "not a socket" in one_line_error(run_vdev("serve", "hello", "--socket-path", str(precious)))
    assert precious.read_text() == "keep me"


GOOD_DEVICE = """
from vdev import Bar, Device, Register

class Dev(Device):
    bar0 = Bar(4096, registers=[Register("status", 0x0)])
"""

# Issue 15: each of these gave a 13-44-line traceback and exit status 1.
BAD_DEVICES = {
    "register outside its BAR": (
        'class Dev(Device):\n    bar0 = Bar(4096, registers=[Register("status", 0x1000)])',
        "mydev.py:4: Dev.bar0: register 'status' at 0x1000 (4 bytes) lies outside the BAR (0x1000 bytes)",
    ),
    "bad BAR size": ("class Dev(Device):\n    bar1 = Bar(3000)", "Dev.bar1: size must be a power of two, not 3000"),
    "width 3": (
        'class Dev(Device):\n    bar0 = Bar(4096, registers=[Register("status", 0x8, width=3)])',
        "mydev.py:5: register 'status' at 0x8: width must be 1, 2, 4 or 8 bytes, not 3",
    ),
    "bad mapped area": (
        "class Dev(Device):\n    bar0 = Bar(8192, mapped=[(0x100, 4096)])",
        "Dev.bar0: mapped area at 0x100 (4096 bytes) must be whole pages",
    ),
    "hook on an unknown register": (
        'class Dev(Device):\n    bar0 = Bar(4096)\n    @bar0.on_read("temp")\n    def read_temp(self): return 1',
        "Dev.bar0: on_read('temp') on read_temp: no such register",
    ),
    "syntax error": ("class Dev(Device)\n    pass", "mydev.py:4: SyntaxError"),
    "exception in __init__": (
        "class Dev(Device):\n    def __init__(self, **kw):\n        super().__init__(**kw)\n        {}['missing']",
        "mydev.py:7: KeyError: 'missing'",
    ),
    "oversized vendor_id": (
        "class Dev(Device):\n    vendor_id = 0x12345",
        "Dev.vendor_id = 74565 does not fit in 16 bits",
    ),
    "register under the MSI-X table": (
        "class Dev(Device):\n    bar0 = Bar(4096, registers=[Register('status', 0x800)])\n"
        "    def capabilities(self):\n"
        "        return [MsiX(vectors=2, table_bar=0, table_offset=0x800, pba_bar=0, pba_offset=0xC00)]",
        "MSI-X table at BAR0+0x800 (32 bytes) overlaps register 'status' at 0x800 (4 bytes)",
    ),
}


@pytest.mark.parametrize("reference", ["mydev:Dev", "./mydev.py:Dev"])
@pytest.mark.parametrize("case", list(BAD_DEVICES))
def test_a_mistake_in_a_device_module_is_one_line_and_status_2(tmp_path: Path, case: str, reference: str) -> None:
    source, message = BAD_DEVICES[case]
    (tmp_path / "mydev.py").write_text(f"from vdev import Bar, Device, MsiX, Register\n\n\n{source}\n")
    line = one_line_error(run_vdev("serve", reference, "--socket-path", str(tmp_path / "s.sock"), cwd=tmp_path))
    assert message in line
    assert "serving" not in line


def test_a_module_that_is_not_found_gets_a_hint(tmp_path: Path) -> None:
    line = one_line_error(run_vdev("serve", "elsewhere:Dev", "--socket-path", str(tmp_path / "s.sock")))
    assert "no module named 'elsewhere'" in line and "./elsewhere.py:Dev" in line


@pytest.mark.requires("libvfio-user")
@pytest.mark.parametrize("reference", ["mydev:Dev", "./mydev.py:Dev"])
def test_serve_finds_a_device_module_in_the_current_directory(tmp_path: Path, reference: str) -> None:
    (tmp_path / "mydev.py").write_text(GOOD_DEVICE)
    socket = tmp_path / "s.sock"
    server = subprocess.Popen(
        [*VDEV, "serve", reference, "--socket-path", str(socket)], cwd=tmp_path, stderr=subprocess.PIPE, text=True
    )
    try:
        assert server.stderr is not None
        announced = server.stderr.readline()  # written once the socket listens
        assert announced.startswith(f"vdev: serving dev ({reference}) on ") and socket.exists()
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=10) == 0
    finally:
        if server.poll() is None:
            server.kill()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--trace", "/nonexistent/trace.jsonl"], "cannot open trace file /nonexistent/trace.jsonl"),
        (["--socket-path", "/nonexistent/s.sock"], "directory /nonexistent does not exist"),
    ],
)
def test_serve_paths_that_cannot_work_are_one_line_and_status_2(tmp_path: Path, extra: list[str], message: str) -> None:
    result = run_vdev("serve", "hello", "--socket-path", str(tmp_path / "s.sock"), *extra)
    assert message in one_line_error(result)


DEVICE_PLAN = '{"faults": [{"on": "read", "action": "delay", "seconds": 1}]}'
WIRE_PLAN = '{"faults": [{"fault": "delay", "seconds": 1, "command": "REGION_READ"}]}'


def test_each_fault_flag_refuses_the_other_kind_of_plan_and_names_the_right_flag(tmp_path: Path) -> None:
    device_plan, wire_plan = tmp_path / "device.json", tmp_path / "wire.json"
    device_plan.write_text(DEVICE_PLAN)
    wire_plan.write_text(WIRE_PLAN)
    served = run_vdev("serve", "hello", "--socket-path", str(tmp_path / "s.sock"), "--device-faults", str(wire_plan))
    assert "wire-fault rule" in one_line_error(served) and "vdev proxy --wire-faults" in one_line_error(served)
    proxy = ["proxy", "--listen", str(tmp_path / "p.sock"), "--connect", str(tmp_path / "s.sock")]
    proxied = run_vdev(*proxy, "--wire-faults", str(device_plan))
    assert "device-fault rule" in one_line_error(proxied) and "vdev serve --device-faults" in one_line_error(proxied)
    old_flag = run_vdev(*proxy, "--faults", str(wire_plan))
    assert old_flag.returncode == 2 and "--faults" in old_flag.stderr


@pytest.mark.requires("libvfio-user")
def test_proxy_refuses_a_live_servers_socket_and_its_own_upstream(tmp_path: Path) -> None:
    live = tmp_path / "live.sock"
    server = subprocess.Popen([*VDEV, "serve", "hello", "--socket-path", str(live)], stderr=subprocess.PIPE, text=True)
    try:
        assert server.stderr is not None and server.stderr.readline().startswith("vdev: serving")
        line = one_line_error(run_vdev("proxy", "--listen", str(live), "--connect", str(tmp_path / "other.sock")))
        assert f"{live} belongs to a server that is still running" in line
        same = one_line_error(
            run_vdev("proxy", "--listen", str(live), "--connect", f"{tmp_path}/../{tmp_path.name}/live.sock")
        )
        assert "--listen and --connect are the same socket" in same
        missing = one_line_error(run_vdev("proxy", "--listen", "/nonexistent/p.sock", "--connect", str(live)))
        assert "directory /nonexistent does not exist" in missing
        inode = live.stat().st_ino
        assert server.poll() is None and live.stat().st_ino == inode  # still the server's own socket
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_devices_lists_bundled_devices_with_parameters() -> None:
    listing = json.loads(run_vdev("devices", "--json").stdout)
    hello = next(entry for entry in listing if entry["name"] == "hello")
    assert hello["id"] == "1b36:0f00"
    assert [p["name"] for p in hello["parameters"]] == ["ident"]


def test_devices_text_shows_ids_in_hex_with_the_help_in_one_column() -> None:
    """Issue 15: ``ident=1212501071`` in decimal, and each help text started where its value happened to end."""
    lines = run_vdev("devices").stdout.splitlines()
    params = [line for line in lines if line.lstrip().startswith("--param ")]
    assert "--param ident=0x48454c4f" in next(line for line in params if "ident=" in line)
    assert "--param split_bar4=true" in next(line for line in params if "split_bar4=" in line)
    help_columns = {len(re.match(r"\s*--param \S+\s+", line).group()) for line in params}  # type: ignore[union-attr]
    assert len(help_columns) == 1


@pytest.mark.requires("qemu", "libvfio-user")
def test_doctor_reports_components() -> None:
    result = run_vdev("doctor", "--json")
    report = json.loads(result.stdout)
    assert result.returncode == 0 and report["ok"]
    checks = {check["name"]: check for check in report["checks"]}
    assert checks["libvfio-user"]["details"]["revision"]
    assert checks["qemu"]["details"]["vfio-user-pci"] is True
    # make deps applied every patch of tools/libvfio-user-patches, and the library shows each fix.
    patches = sorted(path.name for path in PATCHES.glob("*.patch"))
    assert sorted(checks["libvfio-user"]["patches"]) == patches and all(checks["libvfio-user"]["patches"].values())
    assert checks["libvfio-user"]["details"]["patch set"].endswith(f"({len(patches)} patches, recorded in {RECORD})")
    text = run_vdev("doctor").stdout
    assert all(f"present  {patch}" in text for patch in patches)


@pytest.mark.requires("libvfio-user-unpatched")
def test_doctor_says_which_fixes_an_unpatched_library_lacks() -> None:
    env = {**os.environ, "VDEV_LIBVFIO_USER": str(deps.libvfio_user_unpatched_path())}
    env.pop("VDEV_LIBVFIO_USER_REVISION", None)
    result = subprocess.run(
        [*VDEV, "doctor", "--json"], capture_output=True, text=True, env=env, timeout=60, check=False
    )
    libvfio_user = next(check for check in json.loads(result.stdout)["checks"] if check["name"] == "libvfio-user")
    assert libvfio_user["ok"]  # usable: vdev serves with it
    assert libvfio_user["details"]["patch set"] == "none recorded (not built by `make deps`)"
    assert libvfio_user["details"]["fixes"] == f"0 of {len(list(PATCHES.glob('*.patch')))}"
    assert not any(libvfio_user["patches"].values())


def test_doctor_blames_a_bad_setting_not_the_provisioning(tmp_path: Path) -> None:
    """Issue 15: a wrong VDEV_QEMU was answered with "run `make deps`", which cannot fix it."""
    env = {**os.environ, "VDEV_QEMU": str(tmp_path / "missing-qemu"), "VDEV_LIBVFIO_USER": str(tmp_path / "no.so")}
    result = subprocess.run([*VDEV, "doctor"], capture_output=True, text=True, env=env, timeout=60, check=False)
    assert result.returncode == 1
    assert f"fix: fix or unset VDEV_QEMU (now '{tmp_path / 'missing-qemu'}')" in result.stdout
    assert "fix: fix or unset VDEV_LIBVFIO_USER" in result.stdout
    assert "make deps" not in result.stdout


@pytest.mark.requires("qemu", "libvfio-user")
def test_doctor_reports_guest_artefacts_and_test_extras_as_optional(tmp_path: Path) -> None:
    env = {**os.environ, "VDEV_GUEST_DIR": str(tmp_path / "no-guests")}
    result = subprocess.run(
        [*VDEV, "doctor", "--json"], capture_output=True, text=True, env=env, timeout=60, check=False
    )
    report = json.loads(result.stdout)
    checks = {check["name"]: check for check in report["checks"]}
    assert result.returncode == 0 and report["ok"]  # only what serving needs decides the status
    assert not checks["guest"]["ok"] and not checks["guest"]["required"]
    assert checks["guest"]["fix"] == f"fix or unset VDEV_GUEST_DIR (now '{tmp_path / 'no-guests'}')"
    assert checks["test extras"]["ok"] and set(checks["test extras"]["details"]) == {
        "pytest",
        "pytest-trio",
        "qemu.qmp",
    }


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
