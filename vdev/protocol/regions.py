# Rules of this module:
#
# * GET_REGION_INFO's reply may append a capability chain after the 32-byte
#   ``struct vfio_region_info``.  Each capability starts with an 8-byte header
#   (id u16, version u16, next u32); ``cap_offset`` and every ``next`` are
#   offsets from the start of the region info struct, and ``next == 0`` ends
#   the chain.
# * On encoding, capabilities are laid out back to back in the given order.
# * On decoding, the chain is walked from ``cap_offset``.  An offset into the
#   fixed struct, past the payload, or already visited (a loop) is a remote
#   error (EINVAL), as is a capability whose body is cut short.
# * A capability id this codec does not know is kept as raw bytes, running to
#   the next capability or to the end of the payload.
"""The capability chain of a region info reply (sparse mmap areas, region type)."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from errno import EINVAL

from vdev.protocol.errors import RemoteProtocolError

#: Size of ``struct vfio_region_info``, where the capability chain may start.
REGION_INFO_SIZE = 32
#: ``VFIO_REGION_INFO_CAP_SPARSE_MMAP``.
CAP_SPARSE_MMAP = 1
#: ``VFIO_REGION_INFO_CAP_TYPE``.
CAP_TYPE = 2

_CAP_HEADER = struct.Struct("=HHI")
_SPARSE_HEADER = struct.Struct("=II")
_SPARSE_AREA = struct.Struct("=QQ")
_TYPE = struct.Struct("=II")


@dataclass(frozen=True)
class SparseMmapArea:
    """A part of a region the client may mmap, relative to the region's offset."""

    offset: int
    size: int


@dataclass(frozen=True)
class SparseMmapCapability:
    """Only these areas of the region can be mapped; the rest must be trapped."""

    areas: tuple[SparseMmapArea, ...]
    version: int = 1


@dataclass(frozen=True)
class RegionTypeCapability:
    """A device-specific region's type and subtype (``VFIO_REGION_TYPE_*``)."""

    type: int
    subtype: int
    version: int = 1


@dataclass(frozen=True)
class UnknownRegionCapability:
    """A capability this codec does not interpret, kept byte for byte."""

    id: int
    version: int
    data: bytes


RegionCapability = SparseMmapCapability | RegionTypeCapability | UnknownRegionCapability


def _body(cap: RegionCapability) -> tuple[int, bytes]:
    match cap:
        case SparseMmapCapability(areas=areas):
            parts = [_SPARSE_HEADER.pack(len(areas), 0)]
            parts += [_SPARSE_AREA.pack(area.offset, area.size) for area in areas]
            return CAP_SPARSE_MMAP, b"".join(parts)
        case RegionTypeCapability(type=type_, subtype=subtype):
            return CAP_TYPE, _TYPE.pack(type_, subtype)
        case UnknownRegionCapability(id=cap_id, data=data):
            return cap_id, data


def encode_region_capabilities(caps: tuple[RegionCapability, ...]) -> bytes:
    """The chain as it follows a region info struct; empty when there are none."""
    bodies = [_body(cap) for cap in caps]
    out = bytearray()
    offset = REGION_INFO_SIZE
    for position, (cap, (cap_id, body)) in enumerate(zip(caps, bodies, strict=True)):
        end = offset + _CAP_HEADER.size + len(body)
        next_offset = end if position + 1 < len(caps) else 0
        out += _CAP_HEADER.pack(cap_id, cap.version, next_offset)
        out += body
        offset = end
    return bytes(out)


def decode_region_capabilities(payload: bytes, cap_offset: int) -> tuple[RegionCapability, ...]:
    """Walk the chain in ``payload`` (the region info struct and what follows)."""
    caps: list[RegionCapability] = []
    visited: set[int] = set()
    offset = cap_offset
    while offset:
        if offset < REGION_INFO_SIZE or offset + _CAP_HEADER.size > len(payload):
            raise RemoteProtocolError(
                f"region capability at offset {offset} lies outside the {len(payload)}-byte region info",
                EINVAL,
            )
        if offset in visited:
            raise RemoteProtocolError(f"region capability chain loops at offset {offset}", EINVAL)
        visited.add(offset)
        cap_id, version, next_offset = _CAP_HEADER.unpack_from(payload, offset)
        body_start = offset + _CAP_HEADER.size
        caps.append(_decode_one(payload, cap_id, version, body_start, next_offset))
        offset = next_offset
    return tuple(caps)


def _decode_one(payload: bytes, cap_id: int, version: int, start: int, next_offset: int) -> RegionCapability:
    if cap_id == CAP_SPARSE_MMAP:
        _need(payload, start, _SPARSE_HEADER.size, "sparse mmap capability")
        count, _reserved = _SPARSE_HEADER.unpack_from(payload, start)
        areas_start = start + _SPARSE_HEADER.size
        _need(payload, areas_start, count * _SPARSE_AREA.size, f"{count} sparse mmap areas")
        areas = tuple(
            SparseMmapArea(*_SPARSE_AREA.unpack_from(payload, areas_start + i * _SPARSE_AREA.size))
            for i in range(count)
        )
        return SparseMmapCapability(areas=areas, version=version)
    if cap_id == CAP_TYPE:
        _need(payload, start, _TYPE.size, "region type capability")
        type_, subtype = _TYPE.unpack_from(payload, start)
        return RegionTypeCapability(type=type_, subtype=subtype, version=version)
    end = next_offset if next_offset > start else len(payload)
    return UnknownRegionCapability(id=cap_id, version=version, data=bytes(payload[start:end]))


def _need(payload: bytes, start: int, size: int, what: str) -> None:
    if start + size > len(payload):
        raise RemoteProtocolError(
            f"{what} needs {size} bytes at offset {start}, the region info has {len(payload)}",
            EINVAL,
        )
