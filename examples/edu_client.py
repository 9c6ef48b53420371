"""Serve vdev's ``edu`` and drive it from vdev's Python vfio-user client — no QEMU involved.

The client plays the VMM: it enables memory decoding and bus mastering,
offers a memfd as DMA memory, wires INTx to an eventfd, then uses edu's
liveness check, factorial engine and DMA engine.

    .venv/bin/python examples/edu_client.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import trio

from vdev.client import Client
from vdev.protocol.constants import IrqIndex
from vdev.testing import served
from vdev_devices.edu import Edu


async def main() -> None:
    with tempfile.TemporaryDirectory(prefix="vdev-") as directory:
        socket = Path(directory) / "edu.sock"
        async with served(Edu(dma_delay=0.01), socket), Client.connect(socket) as client:
            await client.enable(memory=True, io=False, master=True)
            (intx,) = await client.set_irqs(IrqIndex.INTX, 0, 1)
            ident = await client.read32(0, 0x00)
            print(f"edu identification: {ident:#010x}")

            await client.write32(0, 0x04, 0x1234_5678)
            liveness = await client.read32(0, 0x04)
            print(f"liveness: wrote 0x12345678, read {liveness:#010x}")

            await client.write32(0, 0x20, 0x80)  # interrupt when the factorial is done
            await client.write32(0, 0x08, 10)
            with trio.fail_after(5):
                await intx.wait()
            result = await client.read32(0, 0x08)
            status = await client.read32(0, 0x24)
            print(f"10! = {result} (interrupt status {status:#x})")
            await client.write32(0, 0x64, 0x1)

            memory = await client.dma_map_memfd(0x10_0000, 0x2000)
            memory.write(0, b"hello from the client's memory")
            for offset, value in ((0x80, 0x10_0000), (0x88, 0x40000), (0x90, 30), (0x98, 0x1 | 0x4)):
                await client.write64(0, offset, value)
            with trio.fail_after(5):
                await intx.wait()
            await client.write32(0, 0x64, 0x100)
            for offset, value in ((0x80, 0x40000), (0x88, 0x10_1000), (0x90, 30), (0x98, 0x1 | 0x2 | 0x4)):
                await client.write64(0, offset, value)
            with trio.fail_after(5):
                await intx.wait()
            print(f"DMA round trip through edu's buffer: {memory.read(0x1000, 30)!r}")


if __name__ == "__main__":
    trio.run(main)
