"""Observing a device's MSI messages in guest RAM.

An MSI is nothing but a memory write the device makes: data to an address,
both programmed into its MSI capability.  A guest points the address at its
local APIC (``0xfee00000``); a qtest machine has no CPU to interrupt, so the
test points it at a word of ordinary guest RAM and reads that word back.
That is how QEMU's own qtests observe MSI.

MSI capability layout (id ``0x05``)::

    +0x0  id (8) | next (8) | message control (16)
                              bit 0 enable, bits 1-3 vectors capable (log2),
                              bits 4-6 vectors enabled (log2), bit 7 64-bit
    +0x4  message address, low 32 bits
    +0x8  message address, high 32 bits      (64-bit capable only)
    +0x8 / +0xc  message data (16)           (+0xc when 64-bit capable)

With several vectors enabled the device replaces the low bits of the data
with the vector number, so the data programmed here must have them clear.
"""

from __future__ import annotations

import trio

from vdev.qemu.errors import PciError
from vdev.qemu.pci import PciFunction
from vdev.qemu.qtest import QTestClient

MSI_CAPABILITY_ID = 0x05

_CONTROL = 0x2
_ADDRESS_LOW = 0x4
_ADDRESS_HIGH = 0x8
_CONTROL_ENABLE = 1 << 0
_CONTROL_64BIT = 1 << 7
#: The mailbox word's value while no message has landed.
_EMPTY = 0


class MsiMailbox:
    """The guest-RAM word a function's MSI messages land in.

    Each message overwrites the word, so only the latest one since the last
    :meth:`take` is seen: enough to check that, and with which vector, a
    device signalled.
    """

    def __init__(self, qtest: QTestClient, address: int, data: int, vectors: int) -> None:
        self._qtest = qtest
        #: The guest-physical address messages are written to.
        self.address = address
        #: The message data for vector 0; vector ``n`` writes ``data | n``.
        self.data = data
        #: How many vectors the function was allowed to use.
        self.vectors = vectors

    async def take(self) -> int | None:
        """The vector of the message that landed since the last take, if any."""
        word = await self._qtest.readl(self.address)
        if word == _EMPTY:
            return None
        await self._qtest.writel(self.address, _EMPTY)
        vector = word - self.data
        if not 0 <= vector < self.vectors:
            raise PciError(f"unexpected value {word:#x} at MSI address {self.address:#x}")
        return vector

    async def wait(self, *, poll_interval: float = 0.001) -> int:
        """Wait for a message and return its vector.

        RAM gives no notification, so this polls; put a
        :func:`trio.fail_after` around it.
        """
        while (vector := await self.take()) is None:  # noqa: ASYNC110 - guest RAM cannot notify
            await trio.sleep(poll_interval)
        return vector


async def enable_msi(function: PciFunction, address: int, *, data: int = 0x5A00, vectors: int = 1) -> MsiMailbox:
    """Point ``function``'s MSI at guest RAM ``address``, enable it, return the mailbox.

    The function also needs bus mastering (:meth:`PciFunction.enable`), or
    its messages are dropped.
    """
    cap = await function.find_capability(MSI_CAPABILITY_ID)
    if cap is None:
        raise PciError(f"{function.address} has no MSI capability")
    control = await function.read_config(cap + _CONTROL, 2)
    capable = 1 << ((control >> 1) & 7)
    is_64bit = bool(control & _CONTROL_64BIT)
    if vectors not in (1, 2, 4, 8, 16, 32) or vectors > capable:
        raise ValueError(f"{function.address} supports up to {capable} MSI vectors, not {vectors}")
    if not 0 < data < 0x1_0000 or data & (vectors - 1):
        raise ValueError(f"MSI data {data:#x} must be a nonzero 16-bit value with the vector bits clear")
    if address % 4 or address >= 1 << (64 if is_64bit else 32):
        raise ValueError(f"{address:#x} is not a usable MSI address for {function.address}")
    await function.bus.qtest.writel(address, _EMPTY)
    await function.write_config(cap + _ADDRESS_LOW, address & 0xFFFF_FFFF)
    data_offset = _ADDRESS_HIGH
    if is_64bit:
        await function.write_config(cap + _ADDRESS_HIGH, address >> 32)
        data_offset += 4
    await function.write_config(cap + data_offset, data, 2)
    enabled_log2 = vectors.bit_length() - 1
    control = (control & ~(7 << 4)) | enabled_log2 << 4 | _CONTROL_ENABLE
    await function.write_config(cap + _CONTROL, control, 2)
    return MsiMailbox(function.bus.qtest, address, data, vectors)
