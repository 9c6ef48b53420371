"""idio16 through QEMU in qtest mode: outputs, inputs, and the change interrupt on INTx."""

from __future__ import annotations

import pytest
import trio

from vdev.qemu import q35_intx_gsi
from vdev.testing import AttachQemu
from vdev_devices.idio16 import Gpio, Idio16

pytestmark = pytest.mark.requires("qemu", "libvfio-user")


async def test_lines_and_interrupt_as_the_linux_driver_uses_them(vdev_qemu: AttachQemu) -> None:
    device = Idio16(inputs=0x00A5)
    vm, card = await vdev_qemu(device, enable={"io"}, properties={"addr": "0x4"})
    bars = await card.bars()
    assert bars[2].size == 256 and bars[2].kind.name == "IO"
    await card.bar_writeb(2, 0x3, 0)  # deactivate filters, as the driver's probe does
    await card.bar_writeb(2, 0x1, 0)  # clear interrupt
    await card.bar_writeb(2, 0x0, 0b0000_0101)
    await card.bar_writeb(2, 0x4, 0b1000_0000)
    assert device.outputs == 0x8005
    assert await card.bar_readb(2, 0x0) == 0x05 and await card.bar_readb(2, 0x4) == 0x80
    assert (await card.bar_readb(2, 0x1), await card.bar_readb(2, 0x5)) == (0xA5, 0x00)
    outputs = [e for e in device.events.of_kind(Gpio) if e.direction == "out"]
    changes = [(change.line, change.value) for change in outputs]
    assert changes == [(0, 1), (2, 1), (15, 1)]

    gsi = q35_intx_gsi(card.address, await card.interrupt_pin())
    await vm.qtest.irq_intercept_in("ioapic")
    await card.bar_readb(2, 0x2)  # reading irq_ctl enables the interrupt
    device.set_inputs(0x01A5)
    with trio.fail_after(10):
        await vm.qtest.wait_irq(gsi, raised=True)
    assert await card.bar_readb(2, 0x6) & 1
    assert await card.bar_readb(2, 0x5) == 0x01
    await card.bar_writeb(2, 0x1, 0)  # clear interrupt
    assert await card.bar_readb(2, 0x6) == 0
    await card.bar_writeb(2, 0x2, 0)  # writing irq_ctl disables it
    assert not device.irq_enabled
