"""The pytest fixtures' promises: what vdev_qemu enables, serving once per device, QEMU's stderr on failure."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import trio

from vdev.testing import AttachQemu, ServeDevice
from vdev_devices.hello import Hello

COMMAND = 0x04


async def test_vdev_qemu_turns_on_exactly_the_command_bits_named(vdev_qemu: AttachQemu) -> None:
    device = Hello()
    _vm, function = await vdev_qemu(device, enable={"memory"})
    assert await function.read_config(COMMAND, 2) & 0x7 == 0x2
    assert device.command.memory and not device.command.master and not device.command.io
    _vm, untouched = await vdev_qemu(Hello(name="off"), enable=())
    assert await untouched.read_config(COMMAND, 2) & 0x7 == 0
    assert untouched.bar_address(0)  # the BARs are placed all the same


async def test_vdev_qemu_names_an_unknown_bit(vdev_qemu: AttachQemu) -> None:
    with pytest.raises(ValueError, match=r"unknown COMMAND bits \['mem'\]"):
        await vdev_qemu(Hello(), enable={"mem"})  # type: ignore[arg-type]


async def test_serving_a_device_twice_returns_its_context(vdev_serve: ServeDevice) -> None:
    device = Hello()
    first = await vdev_serve(device)
    assert await vdev_serve(device) is first
    assert (await vdev_serve(Hello())).socket_path != first.socket_path


FAILING = """
import pytest
from vdev_devices.hello import Hello

pytestmark = pytest.mark.trio


async def test_fails(vdev_qemu):
    await vdev_qemu(Hello())
    assert False, "deliberately"
"""


@pytest.mark.requires("qemu", "libvfio-user")
async def test_a_failed_tests_report_carries_qemus_stderr(tmp_path: Path) -> None:
    (tmp_path / "test_failing.py").write_text(FAILING)
    result = await trio.run_process(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_failing.py"],
        cwd=tmp_path,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    output = result.stdout.decode()
    assert result.returncode == 1, output
    assert "deliberately" in output
    assert "QEMU stderr (pid " in output
