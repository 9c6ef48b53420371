"""Attach vdev's ``edu`` to QEMU in qtest mode and compute a factorial with an interrupt.

QEMU's PCI code sees the device over vfio-user; the factorial runs in a Trio
task of the device and raises INTx, which qtest observes at the I/O APIC.

    .venv/bin/python examples/edu_qemu_factorial.py [N]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import trio

from vdev.qemu import QemuMachine, q35_intx_gsi
from vdev.testing import served, vfio_user_pci
from vdev_devices.edu import Edu


async def main(n: int) -> None:
    with tempfile.TemporaryDirectory(prefix="vdev-") as directory:
        socket = Path(directory) / "edu.sock"
        async with served(Edu(), socket), QemuMachine(devices=[vfio_user_pci(socket)]) as vm:
            edu = await (await vm.pci_bus()).find(0x1234, 0x11E8)
            await edu.map_bars()
            await edu.enable(memory=True, io=False, master=True)
            gsi = q35_intx_gsi(edu.address, await edu.interrupt_pin())
            await vm.qtest.irq_intercept_in("ioapic")
            print(f"edu at {edu.address}, BAR0 at {edu.bar_address(0):#x}, INTA -> GSI {gsi}")
            await edu.bar_writel(0, 0x20, 0x80)
            await edu.bar_writel(0, 0x08, n)
            with trio.fail_after(10):
                await vm.qtest.wait_irq(gsi, raised=True)
            print(f"interrupt raised; {n}! mod 2**32 = {await edu.bar_readl(0, 0x08)}")
            await edu.bar_writel(0, 0x64, await edu.bar_readl(0, 0x24))
            with trio.fail_after(10):
                await vm.qtest.wait_irq(gsi, raised=False)
            print("acknowledged; INTx lowered")


if __name__ == "__main__":
    trio.run(main, int(sys.argv[1]) if len(sys.argv) > 1 else 12)
