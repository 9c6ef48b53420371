"""Write your own device: a 24-line vdev device, served with `vdev serve`.

PYTHONPATH=examples .venv/bin/vdev serve my_device:Thermometer --socket-path /tmp/t.sock
.venv/bin/vdev inspect /tmp/t.sock
"""

import random

from vdev import RO, RW, Bar, Device, Msi, Param, Register


class Thermometer(Device):
    """A thermometer: 0x0 temperature (RO, m°C), 0x4 alarm threshold (RW), MSI when above it."""

    vendor_id, device_id = 0x1B36, 0x7E70
    seed = Param(1, help="noise seed")
    bar0 = Bar(4096, registers=[Register("temperature", 0x0, access=RO), Register("threshold", 0x4, access=RW)])

    def capabilities(self):
        return [Msi(vectors=1)]

    @bar0.on_read("temperature")
    def sample(self):
        value = 21_000 + random.Random(self.seed + self.bar0["temperature"]).randint(-500, 500)
        if self.bar0["threshold"] and value > self.bar0["threshold"]:
            self.irq.trigger(0)
        return value
