"""Benchmark 9: guest block I/O through Linux's nvme driver — vdev's ``nvme`` next to QEMU's built-in ``-device nvme``.

The same TCG guest (the ``bookworm`` set of ``make guest``, two CPUs,
``iommu=pt``) boots twice: once with vdev's controller over vfio-user
(namespace in a memfd), once with QEMU's own NVMe controller on a raw
image in ``/dev/shm`` (page cache, like the memfd).  In each, ``dd`` with
O_DIRECT from one CPU writes and reads 64 MiB four times over in 1 MiB
requests and writes 4 MiB in 4 KiB requests; the guest times each case
with its own clock (``/proc/uptime``, 10 ms steps, hence the repeated
passes).  Reported: MiB/s and IOPS, and vdev over QEMU as a ratio.  There
is no target this round: QEMU's model is C inside the VMM, vdev's is
Python in another process, and the ratio says what that costs a guest.
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

import trio

from bench.common import Row, progress
from vdev.qemu.guest import GuestArtefacts, GuestMachine
from vdev.testing import served, vfio_user_pci
from vdev_devices.nvme import Nvme

MiB = 1 << 20
NAME = "9. guest nvme I/O (TCG, dd O_DIRECT)"
SIZE = 128 * MiB
ADDR = "0x4"

#: The guest's workload: time each dd with the guest's uptime clock and report it.
WORKLOAD = r"""
report() { printf 'VDEV {"kind":"%s"%s}\n' "$1" "${2:+,$2}"; }
timed() {  # NAME COMMAND...: seconds the command took
    name=$1; shift
    start=$(cut -d' ' -f1 /proc/uptime)
    "$@" 2>/dev/null || report bench.error "\"case\":\"$name\""
    report bench.time "\"case\":\"$name\",\"seconds\":$(awk -v a="$start" -v b="$(cut -d' ' -f1 /proc/uptime)" \
        'BEGIN {print b - a}')"
}
dev=/dev/$(ls /sys/block | grep nvme | head -n1)
dd if=/dev/urandom of=/tmp/pattern bs=1M count=64 2>/dev/null
passes() { for pass in 1 2 3 4; do taskset -c 0 dd "$@" || return; done; }
timed write-1M passes if=/tmp/pattern of=$dev bs=1M count=64 oflag=direct
timed read-1M passes if=$dev of=/dev/null bs=1M count=64 iflag=direct
timed write-4k taskset -c 0 dd if=/tmp/pattern of=$dev bs=4k count=1024 oflag=direct
report bench.done
"""
CASES = {
    "write-1M": ("write, 1 MiB requests", 4 * 64 * MiB),
    "read-1M": ("read, 1 MiB requests", 4 * 64 * MiB),
    "write-4k": ("write, 4 KiB requests", 4 * MiB),
}


async def _guest_times(devices: list[object], extra_args: list[str], artefacts: GuestArtefacts) -> dict[str, float]:
    machine = GuestMachine(
        kernel=artefacts.kernel,
        initrd=artefacts.initrd,
        devices=devices,  # type: ignore[arg-type]
        extra_args=extra_args,
        files={"/vdev/bench.sh": WORKLOAD},
        run=["sh /vdev/bench.sh"],
        append="iommu=pt",
        memory=512 * MiB,
        smp=2,
        timeout=600,
    )
    times: dict[str, float] = {}
    async with machine as vm:
        async for result in vm:
            if result.kind == "bench.error":
                raise RuntimeError(f"the guest's dd failed: {result.data}")
            if result.kind == "bench.time":
                times[result["case"]] = float(result["seconds"])
            if result.kind == "bench.done":
                break
        await vm.wait_exit()
    return times


async def _vdev(artefacts: GuestArtefacts) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="vdev-") as directory:
        socket = Path(directory) / "nvme.sock"
        async with served(Nvme(size=SIZE), socket):
            return await _guest_times([vfio_user_pci(socket, addr=ADDR)], [], artefacts)


async def _qemu(artefacts: GuestArtefacts) -> dict[str, float]:
    with tempfile.NamedTemporaryFile(dir="/dev/shm", prefix="vdev-bench-nvme-") as image:
        image.truncate(SIZE)
        device = {"driver": "nvme", "serial": "bench", "drive": "bench", "addr": ADDR}
        drive = ["-drive", f"file={image.name},if=none,id=bench,format=raw"]
        return await _guest_times([device], drive, artefacts)


def run(quick: bool) -> list[Row]:
    artefacts = GuestArtefacts.find()
    repeats = 1 if quick else 3
    measured: dict[str, dict[str, list[float]]] = {"vdev": {}, "qemu": {}}
    for round_ in range(repeats):
        for name, boot in (("vdev", _vdev), ("qemu", _qemu)):
            progress(f"{name} nvme guest, round {round_ + 1} of {repeats}")
            for case, seconds in trio.run(boot, artefacts).items():
                measured[name].setdefault(case, []).append(seconds)
    rows: list[Row] = []
    for case, (label, size) in CASES.items():
        results = {}
        for name in ("qemu", "vdev"):
            rates = [size / s / (MiB if case.endswith("1M") else 4096) for s in measured[name][case]]
            results[name] = (statistics.median(rates), rates)
        unit = "MiB/s" if case.endswith("1M") else "IOPS"
        baseline = "QEMU -device nvme"
        rows.append(Row(NAME, f"{label}: QEMU -device nvme", results["qemu"][0], unit, runs=results["qemu"][1]))
        rows.append(
            Row(
                NAME,
                f"{label}: vdev nvme",
                results["vdev"][0],
                unit,
                baseline=baseline,
                ratio=results["vdev"][0] / results["qemu"][0],
                runs=results["vdev"][1],
            )
        )
    return rows
