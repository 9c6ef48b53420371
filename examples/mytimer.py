"""The tutorial's device (docs/tutorial.md): a timer that raises MSI while running."""

from __future__ import annotations

from typing import Any

import trio

from vdev import RO, RW, RW1C, Bar, Device, Msi, Param, Register


class MyTimer(Device):
    """A toy timer.

    BAR0 (4 KiB, trapped):

    ======  =======  ======  ==========================================
    offset  name     access  meaning
    ======  =======  ======  ==========================================
    0x00    magic    RO      0x7157_7157
    0x04    period   RW      period in milliseconds (sticky)
    0x08    status   RW1C    bit 0: the timer fired
    0x0c    control  RW      bit 0: start
    ======  =======  ======  ==========================================
    """

    vendor_id = 0x1B36
    device_id = 0x7157
    class_code = 0xFF0000

    default_period = Param(100, help="period in ms after reset")

    bar0 = Bar(
        4096,
        registers=[
            Register("magic", 0x00, access=RO, reset=0x7157_7157),
            Register("period", 0x04, access=RW, sticky=True),
            Register("status", 0x08, access=RW1C),
            Register("control", 0x0C, access=RW),
        ],
    )

    def __init__(self, name: str | None = None, **params: Any) -> None:
        super().__init__(name, **params)
        self.bar0["period"] = self.default_period
        self.running = False

    def capabilities(self) -> list[Msi]:
        return [Msi(vectors=1)]

    @bar0.on_write("control")
    def control_written(self, value: int) -> None:
        self.running = bool(value & 1)

    async def run(self) -> None:
        while True:
            await trio.sleep(max(self.bar0["period"], 1) / 1000)
            if self.running:
                self.bar0["status"] |= 1
                self.irq.trigger(0)
