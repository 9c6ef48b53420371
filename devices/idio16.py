"""``idio16``: the ACCES PCI-IDIO-16 GPIO card, as Linux's ``gpio-pci-idio-16`` driver expects it.

16 FET-drive outputs and 16 isolated inputs, byte-wide registers in BAR2
(an I/O BAR, as on the real card and in libvfio-user's C sample of the same
card).  Several registers do one thing when read and another when written —
reading ``irq_ctl`` enables the interrupt, writing it disables it — which the
register table expresses with read and write hooks.  Every change of an
output line, and every input change the device makes, is recorded as a
:class:`Gpio` event (the device's own kind, ``gpio`` in traces).  The
input registers are sticky: they mirror the outside world, which a reset of
the card does not change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from vdev import RO, RW, Bar, Device, DeviceEvent, Param, Register

OUTPUT_LINES = 16
IRQ_PENDING = 0x5


@dataclass(frozen=True, slots=True, kw_only=True)
class Gpio(DeviceEvent):
    """A line changed level: an output the client drove (``out``) or an input the device set (``in``)."""

    kind: ClassVar[str] = "gpio"
    direction: str
    line: int
    value: int


class Idio16(Device):
    """ACCES PCI-IDIO-16: 16 outputs, 16 inputs with change interrupts (INTx).

    BAR2 (256 bytes, I/O):

    ======  ==========  ========================================================
    offset  name        meaning
    ======  ==========  ========================================================
    0x0     out0_7      read/write: outputs 0-7
    0x1     in0_7       read: inputs 0-7; write: clear the interrupt
    0x2     irq_ctl     read: enable the change interrupt; write: disable it
    0x3     filter_ctl  read: activate input filters; write: deactivate them
    0x4     out8_15     read/write: outputs 8-15
    0x5     in8_15      read: inputs 8-15
    0x6     irq_status  read: 0x5 while an input-change interrupt is pending, else 0
    ======  ==========  ========================================================

    Why 0x5: Linux's driver decides whether the shared interrupt is the
    card's from this register — 6.12 and later (regmap-irq) test bit 2,
    6.1 tests bit 2 together with bit 0 or 1 — so a pending change sets
    bits 0 and 2.
    """

    vendor_id = 0x494F
    device_id = 0x0DC8
    class_code = 0xFF0000

    inputs = Param(0, help="initial state of the 16 input lines (bit n = line n)")

    bar2 = Bar(
        256,
        kind="io",
        registers=[
            Register("out0_7", 0x0, width=1, access=RW),
            Register("in0_7", 0x1, width=1, access=RO, sticky=True),
            Register("irq_ctl", 0x2, width=1, access=RO),
            Register("filter_ctl", 0x3, width=1, access=RO),
            Register("out8_15", 0x4, width=1, access=RW),
            Register("in8_15", 0x5, width=1, access=RO, sticky=True),
            Register("irq_status", 0x6, width=1, access=RO),
        ],
    )

    def __init__(self, name: str | None = None, **params: Any) -> None:
        super().__init__(name, **params)
        self.irq_enabled = False
        self.filters_active = False
        self._outputs = 0
        self.set_inputs(self.inputs)

    # -- what the outside world sees ---------------------------------------------------

    @property
    def outputs(self) -> int:
        """The 16 output lines as driven by the client (bit n = line n)."""
        return self.bar2["out0_7"] | self.bar2["out8_15"] << 8

    def set_inputs(self, lines: int) -> None:
        """Drive the 16 input lines; a change interrupts the client if it enabled that."""
        old = self.bar2["in0_7"] | self.bar2["in8_15"] << 8
        lines &= 0xFFFF
        self.bar2["in0_7"], self.bar2["in8_15"] = lines & 0xFF, lines >> 8
        for line in range(16):
            if (old ^ lines) >> line & 1:
                self.events.record(Gpio(direction="in", line=line, value=lines >> line & 1))
        if old != lines and self.irq_enabled:
            self.bar2["irq_status"] = IRQ_PENDING
            self.irq.raise_intx()

    # -- register behaviour -------------------------------------------------------------

    def _outputs_written(self, _value: int) -> None:
        new = self.outputs
        for line in range(OUTPUT_LINES):
            if (self._outputs ^ new) >> line & 1:
                self.events.record(Gpio(direction="out", line=line, value=new >> line & 1))
        self._outputs = new

    @bar2.on_write("out0_7")
    def out0_7_written(self, value: int) -> None:
        self._outputs_written(value)

    @bar2.on_write("out8_15")
    def out8_15_written(self, value: int) -> None:
        self._outputs_written(value)

    @bar2.on_write("in0_7")
    def clear_interrupt(self, _value: int) -> None:
        self.bar2["irq_status"] = 0
        self.irq.lower_intx()

    @bar2.on_read("irq_ctl")
    def enable_interrupt(self) -> int:
        self.irq_enabled = True
        return 0

    @bar2.on_write("irq_ctl")
    def disable_interrupt(self, _value: int) -> None:
        self.irq_enabled = False

    @bar2.on_read("filter_ctl")
    def activate_filters(self) -> int:
        self.filters_active = True
        return 0

    @bar2.on_write("filter_ctl")
    def deactivate_filters(self, _value: int) -> None:
        self.filters_active = False
