"""`make demo`: serve a vdev device and let real QEMU (qtest mode) look at it.

Prints what QEMU saw through config space and BAR0 — the IDs, the BAR's
size and address, a register read answered by a Python handler, a write and
its read-back — and then the device's own event log of the same session.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import trio

from vdev import CommandChange, Connect, Disconnect, RegionRead, RegionWrite, Reset
from vdev.qemu import QemuMachine
from vdev.testing import served, vfio_user_pci
from vdev_devices.hello import Hello


async def main() -> None:
    device = Hello()
    with tempfile.TemporaryDirectory(prefix="vdev-demo-") as directory:
        socket = Path(directory) / "hello.sock"
        async with served(device, socket), QemuMachine(devices=[vfio_user_pci(socket)]) as vm:
            print(f"vdev serves {device!r} on {socket}; QEMU attached with vfio-user-pci (qtest mode)")
            function = await (await vm.pci_bus()).find(Hello.vendor_id, Hello.device_id)
            vendor = await function.read_config(0x00, 2)
            device_id = await function.read_config(0x02, 2)
            print(f"QEMU sees PCI device {vendor:04x}:{device_id:04x} at {function.address}")
            bar = (await function.bars())[0]
            addresses = await function.map_bars()
            await function.enable(memory=True, io=False, master=False)
            print(f"BAR0: {bar.size} bytes, programmed at {addresses[0]:#x}; COMMAND.MEM set")
            ident = await function.bar_readl(0, 0x00)
            print(f"read  BAR0+0x00 (id)      -> {ident:#010x}  ({ident.to_bytes(4, 'big').decode()!r})")
            await function.bar_writel(0, 0x04, 0xDEADBEEF)
            print("write BAR0+0x04 (scratch) <- 0xdeadbeef")
            print(f"read  BAR0+0x04 (scratch) -> {await function.bar_readl(0, 0x04):#010x}")
            print(f"read  BAR0+0x08 (reads)   -> {await function.bar_readl(0, 0x08)}")
    print("\nwhat the device recorded:")
    for event in device.events:
        if isinstance(event, Connect | CommandChange | RegionRead | RegionWrite | Reset | Disconnect):
            fields = " ".join(
                f"{key}={value:#x}" if isinstance(value, int) and not isinstance(value, bool) else f"{key}={value}"
                for key, value in event.fields().items()
            )
            print(f"  {event.kind:13} {fields}")


if __name__ == "__main__":
    trio.run(main)
