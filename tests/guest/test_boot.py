"""A real Linux guest sees a vdev device, binds it to vfio-pci and reads it through VFIO.

The first test covers the whole path in one boot: QEMU attaches ``hello``
over vfio-user, the guest kernel enumerates it behind the emulated IOMMU,
vfio-pci takes it, and ``vfio-probe`` (guest/vfio-probe.c) reads BAR0 through
the VFIO region, which QEMU forwards to the device server.  The others check
the harness's own promises: errors that say what happened, timeouts, QEMU
always stopped, kernel problems caught.  Each boots in about 3 s under TCG.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import trio

from vdev.qemu.guest import (
    GuestArtefacts,
    GuestExitedError,
    GuestKernelError,
    GuestMachine,
    GuestTimeoutError,
)
from vdev.testing import served, vfio_user_pci
from vdev_devices.hello import Hello

ADDR = "0000:00:03.0"
HELLO_ID = 0x4845_4C4F


def guest(qemu_binary: Path, artefacts: GuestArtefacts, **options: object) -> GuestMachine:
    return GuestMachine(binary=qemu_binary, kernel=artefacts.kernel, initrd=artefacts.initrd, **options)  # type: ignore[arg-type]


@pytest.mark.requires("libvfio-user")
async def test_guest_binds_hello_to_vfio_pci_and_reads_bar0(
    qemu_binary: Path, guest_artefacts: GuestArtefacts, vdev_socket_dir: Path
) -> None:
    device = Hello()
    socket = vdev_socket_dir / "hello.sock"
    started = time.monotonic()
    commands = [
        "pci-list",
        "echo 1b36 0f00 > /sys/bus/pci/drivers/vfio-pci/new_id",
        f"pci-list; vfio-probe -r 0:0:4 {ADDR}",
    ]
    devices = [vfio_user_pci(socket, addr="0x3")]
    async with served(device, socket), guest(qemu_binary, guest_artefacts, devices=devices, run=commands) as vm:
        ready = await vm.expect("init.ready")
        assert ready["kernel"] == guest_artefacts.release
        assert "vfio_pci" in ready["modules"]

        seen = await vm.expect("pci.device", addr=ADDR)
        assert (seen["vendor"], seen["device"]) == ("1b36", "0f00")
        assert seen["iommu_group"] is not None
        bound = await vm.expect("pci.device", addr=ADDR)
        assert bound["driver"] == "vfio-pci"

        info = await vm.expect("vfio.device")
        assert info["num_regions"] >= 9  # 6 BARs, ROM, config space, VGA
        bar0 = await vm.expect("vfio.region", index=0)
        assert bar0["size"] == 4096
        read = await vm.expect("vfio.read", region=0, offset=0)
        assert read["value"] == HELLO_ID
        assert (await vm.expect("vfio.done"))["status"] == 0
        assert (await vm.expect("run.exit"))["status"] == 0

        await vm.expect("init.done")
        assert await vm.wait_exit() == 0
    assert device.bar0["reads"] >= 1
    assert not vm.kernel_problems
    assert not vm.malformed_results
    assert vm.boot_seconds is not None
    print(f"boot to init.ready: {vm.boot_seconds:.2f} s; whole test: {time.monotonic() - started:.2f} s")


async def test_files_command_line_runs_and_module_parameters_reach_the_guest(
    qemu_binary: Path, guest_artefacts: GuestArtefacts
) -> None:
    script = """#!/bin/sh
for i in 1 2 3; do echo "VDEV {\\"kind\\":\\"tick\\",\\"n\\":$i}"; done
unsafe=$(cat /sys/module/vfio_iommu_type1/parameters/allow_unsafe_interrupts)
echo "VDEV {\\"kind\\":\\"param\\",\\"value\\":\\"$unsafe\\"}"
"""
    options = {"files": {"/opt/ticks": script}, "run": ["/opt/ticks"], "append": 'vdev.run="uname -r"'}
    async with guest(qemu_binary, guest_artefacts, **options) as vm:
        ticks = [result["n"] async for result in vm if result.kind == "tick"]
        assert ticks == [1, 2, 3]
        assert vm.finished
        with pytest.raises(GuestExitedError, match="never.reported"):
            await vm.expect("never.reported")
    assert vm.returncode == 0
    kinds = [(r.kind, r.get("cmd")) for r in vm.results if r.kind.startswith("run.")]
    assert kinds == [("run.start", "/opt/ticks"), ("run.exit", "/opt/ticks")] + [
        ("run.start", "uname -r"),
        ("run.exit", "uname -r"),
    ]
    assert [r["value"] for r in vm.results if r.kind == "param"] == ["Y"]


async def test_a_hung_guest_times_out_with_its_console_and_qemu_is_stopped(
    qemu_binary: Path, guest_artefacts: GuestArtefacts, tmp_path: Path
) -> None:
    vm = guest(qemu_binary, guest_artefacts, run=["sleep 1000"], workdir=tmp_path)
    with pytest.raises(GuestTimeoutError, match="run.exit") as caught:
        async with vm:
            await vm.expect("run.start")
            await vm.expect("run.exit", timeout=1)
    notes = "\n".join(caught.value.__notes__)
    assert '"kind":"run.start"' in notes and str(vm.console_log) in notes
    assert vm.returncode is not None
    assert vm.console_log.read_text().count("VDEV ") >= 2


async def test_the_machine_timeout_bounds_the_whole_block(qemu_binary: Path, guest_artefacts: GuestArtefacts) -> None:
    with pytest.raises(GuestTimeoutError, match="ran out"):
        async with guest(qemu_binary, guest_artefacts, run=["sleep 1000"], timeout=1):
            await trio.sleep_forever()


async def test_a_kernel_crash_fails_the_block(qemu_binary: Path, guest_artefacts: GuestArtefacts) -> None:
    with pytest.raises(GuestKernelError) as caught:
        async with guest(qemu_binary, guest_artefacts, run=["echo c > /proc/sysrq-trigger"]) as vm:
            await vm.wait_exit()
    assert any("Kernel panic" in line for line in caught.value.problems)
