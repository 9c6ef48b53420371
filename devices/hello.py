"""``hello``: the smallest useful vdev device, used by ``make demo`` and the tutorial."""

from __future__ import annotations

from vdev import RO, RW, WO, Bar, Device, Msi, Param, Register


class Hello(Device):
    """A scratch-pad device: an ID register, a scratch register, a read counter and a doorbell.

    BAR0 (4 KiB, 32-bit memory, trapped):

    ======  ========  ======  ==============================================
    offset  name      access  meaning
    ======  ========  ======  ==============================================
    0x00    id        RO      ``0x4845_4c4f`` ("HELO"), or the ``ident`` param
    0x04    scratch   RW      any value; sticky: kept across resets and clients
    0x08    reads     RO      how many times ``id`` was read
    0x0c    doorbell  WO      writing any value signals MSI vector 0
    ======  ========  ======  ==============================================
    """

    vendor_id = 0x1B36
    device_id = 0x0F00
    class_code = 0xFF0000

    ident = Param(0x48454C4F, help="value of the id register")

    bar0 = Bar(
        4096,
        registers=[
            Register("id", 0x00, access=RO),
            Register("scratch", 0x04, access=RW, sticky=True),
            Register("reads", 0x08, access=RO),
            Register("doorbell", 0x0C, access=WO),
        ],
    )

    def capabilities(self) -> list[Msi]:
        return [Msi(vectors=1)]

    @bar0.on_read("id")
    def read_id(self) -> int:
        self.bar0["reads"] += 1
        return self.ident

    @bar0.on_write("doorbell")
    def ring(self, value: int) -> None:
        self.irq.trigger(0)
