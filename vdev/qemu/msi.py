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

MSI-X keeps address and data per vector in a table inside one of the
function's BARs, with a pending-bit array (PBA) beside it.  Under
``vfio-user-pci`` QEMU emulates both: what the guest writes to the table
never reaches the device.  MSI-X capability layout (id ``0x11``)::

    +0x0  id (8) | next (8) | message control (16)
                              bits 0-10 table size - 1, bit 14 function
                              mask, bit 15 enable
    +0x4  table offset (low 3 bits: BAR index)
    +0x8  PBA offset (low 3 bits: BAR index)

    table entry n at table + 16 * n:
    +0x0  message address, low 32 bits
    +0x4  message address, high 32 bits
    +0x8  message data (32)
    +0xc  vector control: bit 0 masked
"""

from __future__ import annotations

from collections.abc import Collection

import trio

from vdev.qemu.errors import PciError
from vdev.qemu.pci import PciFunction
from vdev.qemu.qtest import QTestClient

MSI_CAPABILITY_ID = 0x05
MSIX_CAPABILITY_ID = 0x11

_CONTROL = 0x2
_ADDRESS_LOW = 0x4
_ADDRESS_HIGH = 0x8
_CONTROL_ENABLE = 1 << 0
_CONTROL_64BIT = 1 << 7
#: The mailbox word's value while no message has landed.
_EMPTY = 0

_MSIX_TABLE = 0x4
_MSIX_PBA = 0x8
_MSIX_ENABLE = 1 << 15
_MSIX_FUNCTION_MASK = 1 << 14
_MSIX_ENTRY = 16
_MSIX_ENTRY_CONTROL = 0xC
_MSIX_MASKED = 1 << 0


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


class MsixTable:
    """A function's MSI-X table and PBA, driven the way a guest driver drives them.

    Every access goes through QEMU, like a guest's: table writes land in
    QEMU's emulation, PBA reads show what QEMU (or, while QEMU holds nothing,
    the device) has pending.  :func:`enable_msix` builds one.
    """

    def __init__(
        self, function: PciFunction, capability: int, table: int, pba: int, mailboxes: list[MsiMailbox]
    ) -> None:
        self._function = function
        self._qtest = function.bus.qtest
        self._capability = capability
        #: Guest-physical addresses of the table and the PBA.
        self.table = table
        self.pba = pba
        #: One mailbox per vector, at consecutive words: vector ``n`` writes ``data + n``.
        self.mailboxes = mailboxes

    async def mask(self, vector: int) -> None:
        """Set the vector's mask bit: its messages wait, pending, until :meth:`unmask`."""
        await self._qtest.writel(self._control(vector), _MSIX_MASKED)

    async def unmask(self, vector: int) -> None:
        """Clear the vector's mask bit; a pending message is sent now."""
        await self._qtest.writel(self._control(vector), 0)

    async def mask_function(self, masked: bool) -> None:
        """Set or clear the function mask, which holds every vector."""
        control = await self._function.read_config(self._capability + 2, 2)
        control = control | _MSIX_FUNCTION_MASK if masked else control & ~_MSIX_FUNCTION_MASK
        await self._function.write_config(self._capability + 2, control, 2)

    async def pending(self) -> set[int]:
        """The vectors the PBA shows pending."""
        bits = 0
        for word in range(-(-len(self.mailboxes) // 32)):
            bits |= await self._qtest.readl(self.pba + 4 * word) << (32 * word)
        return {vector for vector in range(len(self.mailboxes)) if bits >> vector & 1}

    def _control(self, vector: int) -> int:
        if not 0 <= vector < len(self.mailboxes):
            raise ValueError(f"{self._function.address} has MSI-X vectors 0..{len(self.mailboxes) - 1}")
        return self.table + _MSIX_ENTRY * vector + _MSIX_ENTRY_CONTROL


async def enable_msix(
    function: PciFunction, address: int, *, data: int = 0x6000, masked: Collection[int] = ()
) -> MsixTable:
    """Point every MSI-X vector of ``function`` at guest RAM, enable MSI-X, return its table.

    Vector ``n`` writes ``data + n`` to ``address + 4 * n``, so each vector
    has a mailbox word of its own; vectors in ``masked`` start masked.  The
    BARs must be mapped (:meth:`PciFunction.map_bars`) and, for messages to
    be sent at all, bus mastering enabled (:meth:`PciFunction.enable`).
    """
    cap = await function.find_capability(MSIX_CAPABILITY_ID)
    if cap is None:
        raise PciError(f"{function.address} has no MSI-X capability")
    control = await function.read_config(cap + _CONTROL, 2)
    vectors = (control & 0x7FF) + 1
    if address % 4 or not 0 < data or data + vectors > 1 << 32:
        raise ValueError(f"{address:#x} and {data:#x} cannot carry {vectors} MSI-X messages")
    locations = []
    for register in (_MSIX_TABLE, _MSIX_PBA):
        value = await function.read_config(cap + register, 4)
        locations.append(function.bar_address(value & 0x7) + (value & ~0x7))
    table, pba = locations
    qtest = function.bus.qtest
    mailboxes = []
    for vector in range(vectors):
        word = address + 4 * vector
        await qtest.writel(word, _EMPTY)
        entry = table + _MSIX_ENTRY * vector
        await qtest.writel(entry, word & 0xFFFF_FFFF)
        await qtest.writel(entry + 4, word >> 32)
        await qtest.writel(entry + 8, data + vector)
        await qtest.writel(entry + _MSIX_ENTRY_CONTROL, _MSIX_MASKED if vector in masked else 0)
        mailboxes.append(MsiMailbox(qtest, word, data, vectors))
    control = (control | _MSIX_ENABLE) & ~_MSIX_FUNCTION_MASK
    await function.write_config(cap + _CONTROL, control, 2)
    return MsixTable(function, cap, table, pba, mailboxes)
