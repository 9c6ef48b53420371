"""Linux's own ``nvme`` driver runs vdev's ``nvme`` controller: a 64 MiB pattern through the block device.

The guest's /init loads ``nvme-core`` and ``nvme``, which bind the
controller by its class code (01:08:02) at boot; ``/dev/nvme0n1`` appears.
The workload writes a random 64 MiB pattern with ``dd`` and O_DIRECT in
four parts of different request sizes (4 MiB in 4 KiB requests, 28 MiB in
64 KiB, 16 MiB in 512 KiB, 16 MiB in 1 MiB), two at a time on different
CPUs so that both I/O queues carry commands, then reads it all back
(O_DIRECT again) and compares.  The server's namespace must
hold the same bytes.

The guest boots with ``iommu=pt``: the emulated IOMMU stays (its interrupt
remapping is what lets x86 give a device several MSI vectors) but device
DMA is not translated, so QEMU maps guest RAM for the server once instead
of once per guest DMA mapping.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from vdev.qemu.guest import GuestArtefacts, GuestMachine
from vdev.testing import served, vfio_user_pci
from vdev_devices.nvme import Nvme
from vdev_devices.nvme.events import NvmeEvent
from vdev_devices.nvme.spec import IoOpcode

pytestmark = pytest.mark.requires("libvfio-user")

MiB = 1 << 20
ADDR = "0000:00:04.0"

#: Shell helpers for guest scripts: one result line per call.
REPORT = r"""
report() { printf 'VDEV {"kind":"%s"%s}\n' "$1" "${2:+,$2}"; }
"""

#: Write a 64 MiB pattern in four parts (two CPUs at a time), read it back, compare, report.
IO_SCRIPT = (
    REPORT
    + r"""
set -u
dev=/dev/nvme0n1
sectors=$(cat /sys/block/nvme0n1/size)
queues=$(ls /sys/block/nvme0n1/mq | wc -l)
driver=$(basename "$(readlink /sys/bus/pci/devices/ADDR/driver)")
report nvme.device "\"sectors\":$sectors,\"queues\":$queues,\"driver\":\"$driver\""
dd if=/dev/urandom of=/tmp/pattern bs=1M count=64 2>/dev/null
part() {  # cpu bs count-of-bs offset-in-bs
    taskset -c "$1" dd if=/tmp/pattern of=$dev bs="$2" count="$3" skip="$4" seek="$4" oflag=direct conv=notrunc \
        2>/tmp/dd.$1.err || { report nvme.error "\"part\":\"$2\""; cat /tmp/dd.$1.err; }
}
part 0 4k 1024 0 & part 1 64k 448 64 & wait
part 0 512k 32 64 & part 1 1M 16 48 & wait
report nvme.written
taskset -c 1 dd if=$dev of=/tmp/readback bs=1M count=64 iflag=direct 2>/dev/null
if cmp -s /tmp/pattern /tmp/readback; then same=true; else same=false; fi
sum=$(sha256sum /tmp/pattern | cut -d' ' -f1)
irqs=$(grep nvme0q /proc/interrupts | awk '{n=0; for (i=2; i<=NF; i++) if ($i ~ /^[0-9]+$/) n+=$i; \
    printf "%s\"%s\":%d", (NR>1?",":""), $NF, n}')
report nvme.verify "\"same\":$same,\"sha256\":\"$sum\",\"interrupts\":{$irqs}"
""".replace("ADDR", ADDR)
)


def nvme_guest(
    qemu_binary: Path, artefacts: GuestArtefacts, socket: Path, script: str, **options: object
) -> GuestMachine:
    """A two-CPU guest with the controller at 00:04.0 and ``script`` as its workload."""
    return GuestMachine(
        binary=qemu_binary,
        kernel=artefacts.kernel,
        initrd=artefacts.initrd,
        devices=[vfio_user_pci(socket, addr="0x4")],
        files={"/vdev/workload.sh": script},
        run=["sh /vdev/workload.sh"],
        append=" ".join(["iommu=pt", str(options.pop("append", ""))]).strip(),
        memory=512 * MiB,
        smp=2,
        timeout=float(options.pop("timeout", 180)),
        **options,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize("interrupts", ["msix", "msi", "intx"])
async def test_a_64_mib_pattern_written_through_the_nvme_driver_reads_back_identical(
    qemu_binary: Path, guest_artefacts: GuestArtefacts, vdev_socket_dir: Path, interrupts: str
) -> None:
    device = Nvme(size=128 * MiB, interrupts=interrupts)
    socket = vdev_socket_dir / "nvme.sock"
    async with served(device, socket), nvme_guest(qemu_binary, guest_artefacts, socket, IO_SCRIPT) as vm:
        ready = await vm.expect("init.ready")
        assert {"nvme_core", "nvme"} <= set(ready["modules"])
        found = await vm.expect("nvme.device")
        assert found["driver"] == "nvme"
        assert found["sectors"] == 128 * MiB // 512
        await vm.expect("nvme.written")
        verify = await vm.expect("nvme.verify")
        await vm.expect("init.done")
        await vm.wait_exit()

    print(f"{guest_artefacts.release} ({interrupts}): {verify.data}")
    assert not [r for r in vm.results if r.kind == "nvme.error"]
    assert verify["same"] is True
    stored = device.active_namespaces[1].contents(0, 64 * MiB)
    assert hashlib.sha256(stored).hexdigest() == verify["sha256"]
    # the guest's own counts: every queue it uses took interrupts
    io_queues = {name: count for name, count in verify["interrupts"].items() if name != "nvme0q0"}
    written = {qid: count for (qid, opcode), count in device.statistics.items() if qid and opcode == IoOpcode.WRITE}
    if interrupts != "intx":
        assert found["queues"] == 2
        assert set(written) == {1, 2}, written
        assert all(count > 0 for count in io_queues.values()) and len(io_queues) == 2
    else:
        assert found["queues"] == 1  # one INTx line: admin and one I/O queue share it
        assert set(written) == {1}
    # every admin command the driver sent (probe, scan, shutdown) succeeded: nothing it asks for is missing
    nvme_events = [e.fields() for e in device.events.of_kind(NvmeEvent)]
    admin = [(e["opcode"], e["cdw10"] & 0xFF) for e in nvme_events if e["what"] == "admin"]
    print(f"admin commands (opcode, CDW10 bits 7:0): {admin}")
    assert not [e for e in nvme_events if e["what"] == "error" and e["qid"] == 0]
    # Identify controller, namespace list, descriptors, namespace; Number of Queues; async event configuration
    assert {(0x06, 0x01), (0x06, 0x02), (0x06, 0x03), (0x06, 0x00), (0x09, 0x07), (0x09, 0x0B)} <= set(admin)
    # the driver shut the controller down cleanly as the guest powered off
    assert any(e["what"] == "shutdown" for e in nvme_events)
