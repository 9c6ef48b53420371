"""Devices the benchmarks serve: the same trapped register as libvfio-user's C gpio sample.

The C sample answers a read of BAR2 (256-byte I/O BAR) offset 0 with a
counter; these do the same, once with a plain handler and once with an
``async`` one, so the three servers do equal work per access.
"""

from __future__ import annotations

from vdev import RO, Bar, Device, Register


class SyncCounter(Device):
    """BAR2 offset 0: a counter that advances on every read (plain handler)."""

    vendor_id = 0x494F
    device_id = 0x0DC8
    bar2 = Bar(256, kind="io", registers=[Register("counter", 0, width=4, access=RO)])

    @bar2.on_read("counter")
    def next_value(self) -> int:
        return self.bar2["counter"] + 1


class AsyncCounter(Device):
    """The same counter behind an ``async`` handler (served threaded)."""

    vendor_id = 0x494F
    device_id = 0x0DC8
    bar2 = Bar(256, kind="io", registers=[Register("counter", 0, width=4, access=RO)])

    @bar2.on_read("counter")
    async def next_value(self) -> int:
        return self.bar2["counter"] + 1
