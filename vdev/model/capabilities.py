"""PCI capabilities as typed objects, laid out by the framework.

A device lists capability objects; :mod:`vdev.model.config` places them in
config space and links the chain, so no device ever writes an offset or a
"next" pointer by hand.  Each capability says what its bytes are at reset
(:meth:`Capability.image`) and which bits the client may write
(:meth:`Capability.write_mask`, :meth:`Capability.clear_mask`); byte 0 is the
ID and byte 1 the next pointer (extended capabilities: a 32-bit header),
which the layout fills in.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field


class Capability:
    """A standard capability (in the first 256 bytes, 8-bit ID)."""

    cap_id: int = 0
    extended = False

    @property
    def size(self) -> int:
        return len(self.image())

    def image(self) -> bytes:
        """The capability's bytes at reset, header included (its pointers are filled in later)."""
        raise NotImplementedError

    def write_mask(self) -> bytes:
        """Bits the client may change, per byte of :meth:`image`."""
        return bytes(self.size)

    def clear_mask(self) -> bytes:
        """Bits a client write of 1 clears (RW1C), per byte."""
        return bytes(self.size)


def _mask(size: int, *spans: tuple[int, int, int]) -> bytes:
    """A mask of ``size`` bytes with little-endian ``(offset, width, value)`` spans set."""
    out = bytearray(size)
    for offset, width, value in spans:
        out[offset : offset + width] = value.to_bytes(width, "little")
    return bytes(out)


@dataclass
class PowerManagement(Capability):
    """PCI Power Management (ID 0x01): D0..D3hot in PMCSR, no PME."""

    cap_id = 0x01

    def image(self) -> bytes:
        return struct.pack("<BBHH", self.cap_id, 0, 0x0003, 0x0008) + bytes(2)

    def write_mask(self) -> bytes:
        return _mask(8, (4, 2, 0x0003))


PCI_MSI_FLAGS_ENABLE = 0x0001
PCI_MSI_FLAGS_64BIT = 0x0080
PCI_MSI_FLAGS_MASKBIT = 0x0100


@dataclass
class Msi(Capability):
    """MSI (ID 0x05) with ``vectors`` (a power of two up to 32), 64-bit, optional per-vector masking."""

    vectors: int = 1
    per_vector_mask: bool = False
    cap_id = 0x05

    def __post_init__(self) -> None:
        if self.vectors not in (1, 2, 4, 8, 16, 32):
            raise ValueError("MSI supports 1, 2, 4, 8, 16 or 32 vectors")

    @property
    def mmc(self) -> int:
        return self.vectors.bit_length() - 1

    def image(self) -> bytes:
        flags = PCI_MSI_FLAGS_64BIT | (self.mmc << 1)
        if self.per_vector_mask:
            flags |= PCI_MSI_FLAGS_MASKBIT
        body = struct.pack("<BBH", self.cap_id, 0, flags) + bytes(4 + 4 + 2 + 2)
        if self.per_vector_mask:
            body += bytes(8)
        return body

    def write_mask(self) -> bytes:
        spans = [(2, 2, 0x0071), (4, 4, 0xFFFFFFFC), (8, 4, 0xFFFFFFFF), (12, 2, 0xFFFF)]
        if self.per_vector_mask:
            spans.append((16, 4, (1 << self.vectors) - 1))
        return _mask(self.size, *spans)


PCI_MSIX_FLAGS_ENABLE = 0x8000
PCI_MSIX_FLAGS_MASKALL = 0x4000


@dataclass
class MsiX(Capability):
    """MSI-X (ID 0x11): table and PBA live in BARs the device declares.

    The framework adds trapped areas for them to the named BARs.
    """

    vectors: int = 1
    table_bar: int = 0
    table_offset: int = 0
    pba_bar: int = 0
    pba_offset: int = 0
    cap_id = 0x11

    def __post_init__(self) -> None:
        if not 1 <= self.vectors <= 2048:
            raise ValueError("MSI-X supports 1 to 2048 vectors")
        if self.table_offset % 8 or self.pba_offset % 8:
            raise ValueError("MSI-X table and PBA offsets must be 8-byte aligned")

    @property
    def table_size(self) -> int:
        return 16 * self.vectors

    @property
    def pba_size(self) -> int:
        return 8 * ((self.vectors + 63) // 64)

    def image(self) -> bytes:
        return struct.pack(
            "<BBHII",
            self.cap_id,
            0,
            self.vectors - 1,
            self.table_offset | self.table_bar,
            self.pba_offset | self.pba_bar,
        )

    def write_mask(self) -> bytes:
        return _mask(12, (2, 2, PCI_MSIX_FLAGS_ENABLE | PCI_MSIX_FLAGS_MASKALL))


PCI_EXP_DEVCAP_FLR = 1 << 28
PCI_EXP_DEVCTL_BCR_FLR = 0x8000


@dataclass
class PciExpress(Capability):
    """PCI Express (ID 0x10), version 2, endpoint; ``flr`` advertises Function Level Reset.

    Writing Initiate-FLR (DEVCTL bit 15) resets the function: the bit itself
    always reads back 0.
    """

    flr: bool = True
    max_payload: int = 128
    cap_id = 0x10

    def image(self) -> bytes:
        pcie_caps = 0x0002  # version 2, endpoint (type 0)
        mps = {128: 0, 256: 1, 512: 2, 1024: 3, 2048: 4, 4096: 5}[self.max_payload]
        devcap = mps | (PCI_EXP_DEVCAP_FLR if self.flr else 0)
        devctl = 0x2810 & ~0x0800  # relaxed ordering, no-snoop, MRRS 512
        linkcap = 0x00000011  # 2.5 GT/s, x1
        linksta = 0x0011
        body = struct.pack("<BBHIHHIHH", self.cap_id, 0, pcie_caps, devcap, devctl, 0, linkcap, 0, linksta)
        return body + bytes(0x3C - len(body))

    def write_mask(self) -> bytes:
        return _mask(0x3C, (8, 2, 0x7CFF), (16, 2, 0x01C3), (40, 2, 0x001F))

    def clear_mask(self) -> bytes:
        return _mask(0x3C, (10, 2, 0x000F))


@dataclass
class VendorSpecific(Capability):
    """Vendor-specific capability (ID 0x09) carrying ``data`` (read-only)."""

    data: bytes = b""
    cap_id = 0x09

    def image(self) -> bytes:
        return struct.pack("<BBB", self.cap_id, 0, 3 + len(self.data)) + self.data


@dataclass
class RawCapability(Capability):
    """An escape hatch: any capability ID with the caller's bytes and masks.

    ``data`` excludes the two header bytes (ID and next pointer).
    """

    cap_id: int = 0
    data: bytes = b""
    writable: bytes = field(default=b"")

    def image(self) -> bytes:
        return bytes([self.cap_id, 0]) + self.data

    def write_mask(self) -> bytes:
        return bytes(2) + self.writable.ljust(len(self.data), b"\0")


class ExtendedCapability(Capability):
    """An extended capability (offset >= 0x100, 16-bit ID, 4-bit version)."""

    extended = True
    version = 1


@dataclass
class DeviceSerialNumber(ExtendedCapability):
    """Device Serial Number (extended ID 0x0003)."""

    serial: int = 0
    cap_id = 0x0003

    def image(self) -> bytes:
        return struct.pack("<IQ", 0, self.serial)


@dataclass
class VendorSpecificExtended(ExtendedCapability):
    """Vendor-specific extended capability (ID 0x000B) with a VSEC ID, revision and data."""

    vsec_id: int = 0
    vsec_rev: int = 0
    data: bytes = b""
    cap_id = 0x000B

    def image(self) -> bytes:
        length = 8 + len(self.data)
        header = self.vsec_id | (self.vsec_rev << 16) | (length << 20)
        return struct.pack("<II", 0, header) + self.data
