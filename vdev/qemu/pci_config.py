"""Reaching PCI configuration space over qtest.

Two mechanisms, both what firmware uses on x86:

* mechanism #1, every x86 machine: write the function and offset to port
  ``0xcf8``, then move data through ``0xcfc``-``0xcff``; 256 bytes per
  function, and two qtest commands per access;
* ECAM on q35: configuration space mapped into memory, 4 KiB per function,
  once the MCH's PCIEXBAR enables it - which firmware does, and under qtest
  :func:`enable_q35_ecam` must.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import trio

from vdev.qemu.qtest import QTestClient

#: Where q35 firmware conventionally places ECAM (and QEMU's PCIEXBAR reset value).
Q35_ECAM_BASE = 0xB000_0000
#: ECAM for 256 buses: 1 MiB each.
Q35_ECAM_SIZE = 256 << 20
_Q35_PCIEXBAR = 0x60

_CONFIG_ADDRESS_PORT = 0xCF8
_CONFIG_DATA_PORT = 0xCFC


@dataclass(frozen=True, order=True)
class PciAddress:
    """A function's bus/device/function triple, printed as ``00:01.0``."""

    bus: int
    device: int
    function: int

    def __post_init__(self) -> None:
        if not (0 <= self.bus < 256 and 0 <= self.device < 32 and 0 <= self.function < 8):
            raise ValueError(f"invalid PCI address {self.bus}:{self.device}.{self.function}")

    def __str__(self) -> str:
        return f"{self.bus:02x}:{self.device:02x}.{self.function:x}"


def _check_config_access(offset: int, size: int, limit: int) -> None:
    if size not in (1, 2, 4):
        raise ValueError(f"configuration access size must be 1, 2 or 4, not {size}")
    if offset % size or not 0 <= offset <= limit - size:
        raise ValueError(f"bad configuration access of {size} bytes at {offset:#x}")


class ConfigAccess(Protocol):
    """A way to reach PCI configuration space."""

    async def read(self, address: PciAddress, offset: int, size: int) -> int:
        """Read ``size`` bytes (1, 2 or 4, naturally aligned) at ``offset``."""
        ...

    async def write(self, address: PciAddress, offset: int, value: int, size: int) -> None:
        """Write ``size`` bytes (1, 2 or 4, naturally aligned) at ``offset``."""
        ...


class PortConfigAccess:
    """Configuration mechanism #1 through ports ``0xcf8``/``0xcfc``: every x86 machine has it.

    An access is two qtest commands (select, then transfer); a lock keeps
    concurrent tasks from interleaving them.
    """

    def __init__(self, qtest: QTestClient) -> None:
        self._qtest = qtest
        self._lock = trio.Lock()

    def _select(self, address: PciAddress, offset: int) -> int:
        return 0x8000_0000 | address.bus << 16 | address.device << 11 | address.function << 8 | offset & 0xFC

    async def read(self, address: PciAddress, offset: int, size: int) -> int:
        """Read ``size`` bytes at ``offset`` (below 0x100: mechanism #1 has no extended space)."""
        _check_config_access(offset, size, 0x100)
        async with self._lock:
            await self._qtest.outl(_CONFIG_ADDRESS_PORT, self._select(address, offset))
            return await self._qtest.port_read(_CONFIG_DATA_PORT + (offset & 3), size)

    async def write(self, address: PciAddress, offset: int, value: int, size: int) -> None:
        """Write ``size`` bytes at ``offset`` (below 0x100)."""
        _check_config_access(offset, size, 0x100)
        async with self._lock:
            await self._qtest.outl(_CONFIG_ADDRESS_PORT, self._select(address, offset))
            await self._qtest.port_write(_CONFIG_DATA_PORT + (offset & 3), value, size)


class EcamConfigAccess:
    """Memory-mapped configuration (ECAM): one access per command, 4 KiB per function."""

    def __init__(self, qtest: QTestClient, base: int) -> None:
        self._qtest = qtest
        self._base = base

    def _addr(self, address: PciAddress, offset: int) -> int:
        return self._base | address.bus << 20 | address.device << 15 | address.function << 12 | offset

    async def read(self, address: PciAddress, offset: int, size: int) -> int:
        """Read ``size`` bytes at ``offset`` (below 0x1000)."""
        _check_config_access(offset, size, 0x1000)
        return await self._qtest.read(self._addr(address, offset), size)

    async def write(self, address: PciAddress, offset: int, value: int, size: int) -> None:
        """Write ``size`` bytes at ``offset`` (below 0x1000)."""
        _check_config_access(offset, size, 0x1000)
        await self._qtest.write(self._addr(address, offset), value, size)


async def enable_q35_ecam(qtest: QTestClient, base: int = Q35_ECAM_BASE) -> EcamConfigAccess:
    """Turn on q35's 256-bus ECAM window at ``base`` and return access through it.

    The MCH decodes ECAM only once firmware sets the enable bit of PCIEXBAR
    (offset 0x60 of 00:00.0); under qtest no firmware does.  A machine reset
    turns it off again.
    """
    if base % Q35_ECAM_SIZE:
        raise ValueError(f"ECAM base {base:#x} must be aligned to 256 MiB")
    ports = PortConfigAccess(qtest)
    host = PciAddress(0, 0, 0)
    await ports.write(host, _Q35_PCIEXBAR + 4, base >> 32, 4)
    await ports.write(host, _Q35_PCIEXBAR, (base & 0xFFFF_FFFF) | 1, 4)
    return EcamConfigAccess(qtest, base)
