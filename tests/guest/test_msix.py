"""MSI-X all the way into a Linux guest: device -> vdev -> QEMU's vfio-user-pci -> guest MSI-X -> vfio-pci.

The guest binds a two-vector MSI-X device to vfio-pci; ``msix-probe``
(guest/msix-probe.c) asks VFIO for both vectors with an eventfd each — so
the guest kernel programs and unmasks them in the MSI-X table QEMU emulates,
and enables MSI-X — then rings each vector through the device's doorbell and
waits for that vector's eventfd.  Issue 15: no MSI-X interrupt ever reached
a guest, because vdev gated vectors on its own (never written) copy of the
table.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import pytest

from vdev import RO, WO, Bar, Device, MsiX, Register
from vdev.model.events import Irq
from vdev.qemu.guest import GUEST_BUILD_COMMAND, GuestArtefacts, GuestMachine, guest_dir
from vdev.testing import served, vfio_user_pci

ADDR = "0000:00:03.0"

pytestmark = pytest.mark.requires("libvfio-user")


class Ringer(Device):
    """Two MSI-X vectors (table at BAR0+0x800, PBA at +0xc00); writing ``n`` to the doorbell rings vector ``n``."""

    vendor_id = 0x1B36
    device_id = 0x5158
    bar0 = Bar(4096, registers=[Register("doorbell", 0x0, access=WO), Register("id", 0x4, access=RO, reset=0x5158)])

    def capabilities(self) -> list[MsiX]:
        return [MsiX(vectors=2, table_bar=0, table_offset=0x800, pba_bar=0, pba_offset=0xC00)]

    @bar0.on_write("doorbell")
    def ring(self, value: int) -> None:
        self.irq.trigger(value)


@pytest.fixture
def msix_probe(missing: Callable[[str], NoReturn]) -> None:
    """The guest program this test runs, which ``make guest`` builds into the initramfs."""
    if not (guest_dir() / "programs" / "msix-probe").exists():
        missing(f"msix-probe is not in the guest initramfs yet; run `{GUEST_BUILD_COMMAND}`")


@pytest.mark.usefixtures("msix_probe")
async def test_a_guest_driver_receives_every_msix_vector(
    qemu_binary: Path, guest_artefacts: GuestArtefacts, vdev_socket_dir: Path
) -> None:
    device = Ringer()
    socket = vdev_socket_dir / "ringer.sock"
    commands = ["echo 1b36 5158 > /sys/bus/pci/drivers/vfio-pci/new_id", f"msix-probe {ADDR} 2"]
    machine = GuestMachine(
        binary=qemu_binary,
        kernel=guest_artefacts.kernel,
        initrd=guest_artefacts.initrd,
        devices=[vfio_user_pci(socket, addr="0x3")],
        run=commands,
    )
    async with served(device, socket), machine as vm:
        await vm.expect("init.ready")
        assert (await vm.expect("msix.enabled"))["vectors"] == 2
        assert device.irq.mode == "msix"  # the guest kernel enabled MSI-X, and QEMU forwarded it
        assert [(await vm.expect("msix.vector"))["vector"] for _ in range(2)] == [0, 1]
        assert (await vm.expect("msix.done"))["status"] == 0
        await vm.expect("init.done")
        assert await vm.wait_exit() == 0
    assert not vm.kernel_problems
    fired = [(e.vector, e.held) for e in device.events.of_kind(Irq)]
    assert fired == [(0, None), (1, None)]
