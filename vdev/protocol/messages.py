# Rules of this module:
#
# * One frozen, keyword-only dataclass per (command, direction) of the spec:
#   ``<Name>Request`` for the command, ``<Name>Reply`` for its answer.  A
#   request class names its reply class (``Request[XReply]``) so callers get
#   typed answers.
# * Every message carries its framing: ``msg_id``, the ``fds`` that travel
#   with it as SCM_RIGHTS, and (requests only) ``no_reply``.  ``command`` is
#   fixed by the class, except in ``ErrorReply``, ``RawRequest`` and
#   ``RawReply``, which stand for any command.
# * A reply with the ERROR flag decodes to ``ErrorReply`` whatever its
#   command; its payload, which the spec forbids but libvfio-user sends after
#   a failed region access, is kept rather than rejected.
# * A command number without a typed class decodes to ``RawRequest`` /
#   ``RawReply`` with the payload untouched: unknown is not malformed.
# * Payloads are in host byte order.  A payload shorter than its fixed layout,
#   or data shorter than the ``count`` announcing it, is a remote error
#   (EINVAL).  Bytes beyond what the layout defines are ignored, as
#   libvfio-user does (its DMA_WRITE pads the last chunk).
# * ``argsz`` fields default to ``None``: "the natural size" of the message,
#   computed when encoding.  Decoding folds a natural argsz back into ``None``
#   and keeps any other value: a request's argsz bounds its reply, and a
#   reply's may announce more than it carries.  So decode(encode(m)) == m.
# * ``count``/``size`` fields that merely restate ``len(data)`` are not
#   fields: they are derived from the data when encoding.
# * Encoding never validates semantics (a request may ask for anything); it
#   only fails with a local error when a value does not fit its wire field.
"""Typed vfio-user messages: every command of the spec in both directions."""

from __future__ import annotations

import dataclasses
import struct
from dataclasses import dataclass, field
from errno import EINVAL
from typing import Any, Generic, Self, TypeVar

from vdev.protocol.capabilities import Capabilities, decode_version_data, encode_version_data
from vdev.protocol.constants import (
    FEATURE_INDEX_MASK,
    DeviceFlag,
    DmaFlag,
    FeatureFlag,
    IrqInfoFlag,
    IrqSetFlag,
    RegionFlag,
)
from vdev.protocol.errors import LocalProtocolError, RemoteProtocolError
from vdev.protocol.header import (
    FLAG_ERROR,
    FLAG_NO_REPLY,
    HEADER_SIZE,
    Command,
    Header,
    MessageType,
    as_command,
)
from vdev.protocol.regions import (
    REGION_INFO_SIZE,
    RegionCapability,
    decode_region_capabilities,
    encode_region_capabilities,
)

ReplyT = TypeVar("ReplyT", bound="Reply")


def _fixed(command: Command) -> Any:
    """The ``command`` field of a typed message: set by the class, not the caller."""
    return field(default=command, init=False, repr=False)


def _unpack(layout: struct.Struct, payload: bytes, what: str, offset: int = 0) -> tuple[Any, ...]:
    if len(payload) < offset + layout.size:
        raise RemoteProtocolError(f"{what} needs {offset + layout.size} payload bytes, got {len(payload)}", EINVAL)
    return layout.unpack_from(payload, offset)


def _data(payload: bytes, start: int, count: int, what: str) -> bytes:
    if len(payload) - start < count:
        raise RemoteProtocolError(
            f"{what} announces {count} data bytes, carries {max(len(payload) - start, 0)}", EINVAL
        )
    return bytes(payload[start : start + count])


@dataclass(frozen=True, kw_only=True)
class _Sized:
    """A message with an ``argsz`` field; ``None`` stands for its natural size."""

    argsz: int | None = None

    def _natural_argsz(self) -> int:
        raise NotImplementedError

    def _wire_argsz(self) -> int:
        return self._natural_argsz() if self.argsz is None else self.argsz


@dataclass(frozen=True, kw_only=True)
class Message:
    """Any vfio-user message, with the framing that travels with it."""

    command: int
    msg_id: int = 0
    #: File descriptors passed with the message (SCM_RIGHTS), in order.
    fds: tuple[int, ...] = ()

    def _flags(self) -> int:
        raise NotImplementedError

    def _error(self) -> int:
        return 0

    def encode_payload(self) -> bytes:
        """The bytes after the header."""
        raise NotImplementedError

    @classmethod
    def _decode_payload(cls, payload: bytes) -> Self:
        raise NotImplementedError

    def encode(self) -> bytes:
        """The whole message as it goes on the wire, header included.

        The ``fds`` are not part of the bytes; send them alongside.
        """
        try:
            payload = self.encode_payload()
        except struct.error as exc:
            raise LocalProtocolError(f"field out of range in {self!r}: {exc}", EINVAL) from exc
        header = Header(
            msg_id=self.msg_id,
            command=self.command,
            size=HEADER_SIZE + len(payload),
            flags=self._flags(),
            error=self._error(),
        )
        return header.encode() + payload

    @classmethod
    def decode(cls, data: bytes, fds: tuple[int, ...] = ()) -> Self:
        """Parse exactly one whole message; on a subclass, insist on that type."""
        if len(data) < HEADER_SIZE:
            raise RemoteProtocolError(f"{len(data)} bytes cannot hold a header", EINVAL, fds=fds)
        header = Header.decode(data)
        if header.size != len(data):
            raise RemoteProtocolError(
                f"header says {header.size} bytes, got {len(data)}", EINVAL, header=header, fds=fds
            )
        message = decode_message(header, bytes(data[HEADER_SIZE:]), fds)
        if not isinstance(message, cls):
            raise RemoteProtocolError(
                f"expected {cls.__name__}, decoded {type(message).__name__}",
                EINVAL,
                header=header,
                fds=fds,
            )
        return message


@dataclass(frozen=True, kw_only=True)
class Reply(Message):
    """A reply; matched to its request by ``msg_id`` alone."""

    def _flags(self) -> int:
        return MessageType.REPLY


@dataclass(frozen=True, kw_only=True)
class Request(Message, Generic[ReplyT]):
    """A command; ``no_reply`` asks the receiver not to answer it."""

    no_reply: bool = False

    def _flags(self) -> int:
        return MessageType.COMMAND | (FLAG_NO_REPLY if self.no_reply else 0)


@dataclass(frozen=True, kw_only=True)
class ErrorReply(Reply):
    """A reply reporting that the command failed with ``errno``.

    ``errno`` may be 0: the spec allows an error without a reason.
    """

    errno: int
    payload: bytes = b""

    def _flags(self) -> int:
        return MessageType.REPLY | FLAG_ERROR

    def _error(self) -> int:
        return self.errno

    def encode_payload(self) -> bytes:
        return self.payload


@dataclass(frozen=True, kw_only=True)
class RawRequest(Request[Reply]):
    """A command this codec has no type for, or one built byte by byte."""

    payload: bytes = b""

    def encode_payload(self) -> bytes:
        return self.payload


@dataclass(frozen=True, kw_only=True)
class RawReply(Reply):
    """A successful reply to a command this codec has no type for."""

    payload: bytes = b""

    def encode_payload(self) -> bytes:
        return self.payload


# --- VERSION ---------------------------------------------------------------

_VERSION = struct.Struct("=HH")


@dataclass(frozen=True, kw_only=True)
class _VersionPayload:
    """major/minor and the optional JSON capabilities (``None``: no JSON sent)."""

    major: int
    minor: int
    capabilities: Capabilities | None = None

    def encode_payload(self) -> bytes:
        head = _VERSION.pack(self.major, self.minor)
        if self.capabilities is None:
            return head
        return head + encode_version_data(self.capabilities)

    @classmethod
    def _decode_payload(cls, payload: bytes) -> Self:
        major, minor = _unpack(_VERSION, payload, "VERSION")
        rest = payload[_VERSION.size :]
        caps = decode_version_data(rest) if rest else None
        return cls(major=major, minor=minor, capabilities=caps)


@dataclass(frozen=True, kw_only=True)
class VersionReply(_VersionPayload, Reply):
    """The server's accepted version (same major, minor <= proposed) and capabilities."""

    command: int = _fixed(Command.VERSION)


@dataclass(frozen=True, kw_only=True)
class VersionRequest(_VersionPayload, Request[VersionReply]):
    """The client's proposed version and capabilities; must be the first message."""

    command: int = _fixed(Command.VERSION)


# --- DMA_MAP / DMA_UNMAP ------------------------------------------------------

_DMA_MAP = struct.Struct("=IIQQQ")
_DMA_UNMAP = struct.Struct("=IIQQ")


@dataclass(frozen=True, kw_only=True)
class DmaMapReply(Reply):
    """DMA_MAP succeeded; no payload."""

    command: int = _fixed(Command.DMA_MAP)

    def encode_payload(self) -> bytes:
        return b""

    @classmethod
    def _decode_payload(cls, payload: bytes) -> Self:
        return cls()


@dataclass(frozen=True, kw_only=True)
class DmaMapRequest(_Sized, Request[DmaMapReply]):
    """Offer client memory [address, address+size) for DMA.

    With one fd in ``fds`` the server may mmap it at ``offset``; without, it
    must use DMA_READ/DMA_WRITE messages.
    """

    command: int = _fixed(Command.DMA_MAP)
    address: int
    size: int
    flags: int = DmaFlag.READ | DmaFlag.WRITE
    offset: int = 0

    def _natural_argsz(self) -> int:
        return _DMA_MAP.size

    def encode_payload(self) -> bytes:
        return _DMA_MAP.pack(self._wire_argsz(), self.flags, self.offset, self.address, self.size)

    @classmethod
    def _decode_payload(cls, payload: bytes) -> Self:
        argsz, flags, offset, address, size = _unpack(_DMA_MAP, payload, "DMA_MAP")
        return cls(argsz=argsz, flags=DmaFlag(flags), offset=offset, address=address, size=size)


@dataclass(frozen=True, kw_only=True)
class _DmaUnmapPayload(_Sized):
    """The DMA region to drop; the reply echoes it back."""

    address: int
    size: int
    flags: int = 0

    def _natural_argsz(self) -> int:
        return _DMA_UNMAP.size

    def encode_payload(self) -> bytes:
        return _DMA_UNMAP.pack(self._wire_argsz(), self.flags, self.address, self.size)

    @classmethod
    def _decode_payload(cls, payload: bytes) -> Self:
        argsz, flags, address, size = _unpack(_DMA_UNMAP, payload, "DMA_UNMAP")
        return cls(argsz=argsz, flags=flags, address=address, size=size)


@dataclass(frozen=True, kw_only=True)
class DmaUnmapReply(_DmaUnmapPayload, Reply):
    """The unmapped region, echoed once the server holds no reference to it."""

    command: int = _fixed(Command.DMA_UNMAP)


@dataclass(frozen=True, kw_only=True)
class DmaUnmapRequest(_DmaUnmapPayload, Request[DmaUnmapReply]):
    """Withdraw a region; address and size must match a previous DMA_MAP exactly."""

    command: int = _fixed(Command.DMA_UNMAP)


# --- DEVICE_GET_INFO ----------------------------------------------------------

_DEVICE_INFO = struct.Struct("=IIII")


@dataclass(frozen=True, kw_only=True)
class DeviceInfoReply(_Sized, Reply):
    """Device flags (``DeviceFlag``) and how many regions and IRQ types it has."""

    command: int = _fixed(Command.DEVICE_GET_INFO)
    flags: int
    num_regions: int
    num_irqs: int

    def _natural_argsz(self) -> int:
        return _DEVICE_INFO.size

    def encode_payload(self) -> bytes:
        return _DEVICE_INFO.pack(self._wire_argsz(), self.flags, self.num_regions, self.num_irqs)

    @classmethod
    def _decode_payload(cls, payload: bytes) -> Self:
        argsz, flags, num_regions, num_irqs = _unpack(_DEVICE_INFO, payload, "DEVICE_GET_INFO")
        return cls(argsz=argsz, flags=DeviceFlag(flags), num_regions=num_regions, num_irqs=num_irqs)


@dataclass(frozen=True, kw_only=True)
class DeviceInfoRequest(_Sized, Request[DeviceInfoReply]):
    """Ask for the device info; ``argsz`` is the largest reply accepted."""

    command: int = _fixed(Command.DEVICE_GET_INFO)

    def _natural_argsz(self) -> int:
        return _DEVICE_INFO.size

    def encode_payload(self) -> bytes:
        return _DEVICE_INFO.pack(self._wire_argsz(), 0, 0, 0)

    @classmethod
    def _decode_payload(cls, payload: bytes) -> Self:
        (argsz, *_zero) = _unpack(_DEVICE_INFO, payload, "DEVICE_GET_INFO")
        return cls(argsz=argsz)


# --- DEVICE_GET_REGION_INFO -----------------------------------------------------

_REGION_INFO = struct.Struct("=IIIIQQ")
# A plain int: inverting the IntFlag member would also clear unknown bits.
_CAPS = int(RegionFlag.CAPS)


@dataclass(frozen=True, kw_only=True)
class RegionInfoReply(_Sized, Reply):
    """A region's flags, size, mmap offset and capability chain.

    ``flags`` never includes ``RegionFlag.CAPS``: that bit is set on the wire
    exactly when ``capabilities`` is not empty.  If ``argsz`` exceeds what the
    request allowed, the server left the capabilities out; ask again with
    this ``argsz``.  The fds for mmap-able regions travel in ``fds``.
    """

    command: int = _fixed(Command.DEVICE_GET_REGION_INFO)
    index: int
    flags: int
    size: int
    offset: int = 0
    capabilities: tuple[RegionCapability, ...] = ()

    def _natural_argsz(self) -> int:
        return REGION_INFO_SIZE + len(encode_region_capabilities(self.capabilities))

    def encode_payload(self) -> bytes:
        caps = encode_region_capabilities(self.capabilities)
        flags = self.flags & ~_CAPS
        cap_offset = 0
        if caps:
            flags |= RegionFlag.CAPS
            cap_offset = REGION_INFO_SIZE
        argsz = self._wire_argsz()
        fixed = _REGION_INFO.pack(argsz, flags, self.index, cap_offset, self.size, self.offset)
        return fixed + caps

    @classmethod
    def _decode_payload(cls, payload: bytes) -> Self:
        argsz, flags, index, cap_offset, size, offset = _unpack(_REGION_INFO, payload, "DEVICE_GET_REGION_INFO")
        caps = decode_region_capabilities(payload, cap_offset) if flags & RegionFlag.CAPS else ()
        return cls(
            argsz=argsz,
            flags=RegionFlag(flags & ~_CAPS),
            index=index,
            size=size,
            offset=offset,
            capabilities=caps,
        )


@dataclass(frozen=True, kw_only=True)
class RegionInfoRequest(_Sized, Request[RegionInfoReply]):
    """Ask about region ``index``; ``argsz`` bounds the reply, capabilities included."""

    command: int = _fixed(Command.DEVICE_GET_REGION_INFO)
    index: int

    def _natural_argsz(self) -> int:
        return REGION_INFO_SIZE

    def encode_payload(self) -> bytes:
        return _REGION_INFO.pack(self._wire_argsz(), 0, self.index, 0, 0, 0)

    @classmethod
    def _decode_payload(cls, payload: bytes) -> Self:
        argsz, _flags, index, *_zero = _unpack(_REGION_INFO, payload, "DEVICE_GET_REGION_INFO")
        return cls(argsz=argsz, index=index)


# --- DEVICE_GET_REGION_IO_FDS ---------------------------------------------------

_IO_FDS = struct.Struct("=IIII")
_SUB_REGION = struct.Struct("=QQIIIIQ")


@dataclass(frozen=True)
class SubRegionFd:
    """One sub-region served through an fd (``IoFdType``).

    ``data`` is the datamatch value of an ioeventfd, the user_data of an
    ioregionfd; ``fd_index`` points into the reply's ``fds``.
    """

    offset: int
    size: int
    fd_index: int
    type: int
    flags: int = 0
    data: int = 0


@dataclass(frozen=True, kw_only=True)
class RegionIoFdsReply(_Sized, Reply):
    """The sub-regions of a region that have ioeventfds or ioregionfds.

    ``sub_regions`` is empty when they did not fit in the request's
    ``argsz``; then ``count`` says how many exist and ``argsz`` what would
    fit them.  ``count`` is ``None`` when it is simply the list's length.
    """

    command: int = _fixed(Command.DEVICE_GET_REGION_IO_FDS)
    index: int
    sub_regions: tuple[SubRegionFd, ...] = ()
    count: int | None = None
    flags: int = 0

    @property
    def total(self) -> int:
        """How many sub-regions the region has, whether or not all are listed."""
        return len(self.sub_regions) if self.count is None else self.count

    def _natural_argsz(self) -> int:
        return _IO_FDS.size + self.total * _SUB_REGION.size

    def encode_payload(self) -> bytes:
        argsz = self._wire_argsz()
        parts = [_IO_FDS.pack(argsz, self.flags, self.index, self.total)]
        parts += [_SUB_REGION.pack(s.offset, s.size, s.fd_index, s.type, s.flags, 0, s.data) for s in self.sub_regions]
        return b"".join(parts)

    @classmethod
    def _decode_payload(cls, payload: bytes) -> Self:
        argsz, flags, index, count = _unpack(_IO_FDS, payload, "DEVICE_GET_REGION_IO_FDS")
        subs: tuple[SubRegionFd, ...] = ()
        # The spec sizes entries as (argsz - header) / count, not as 40 bytes.
        stride = (argsz - _IO_FDS.size) // count if count else 0
        if count and stride >= _SUB_REGION.size and len(payload) >= _IO_FDS.size + count * stride:
            entries = (_SUB_REGION.unpack_from(payload, _IO_FDS.size + i * stride) for i in range(count))
            subs = tuple(
                SubRegionFd(offset=o, size=s, fd_index=i, type=t, flags=f, data=d) for o, s, i, t, f, _pad, d in entries
            )
        return cls(
            argsz=argsz,
            flags=flags,
            index=index,
            count=None if count == len(subs) else count,
            sub_regions=subs,
        )


@dataclass(frozen=True, kw_only=True)
class RegionIoFdsRequest(_Sized, Request[RegionIoFdsReply]):
    """Ask which sub-regions of region ``index`` can be driven through fds."""

    command: int = _fixed(Command.DEVICE_GET_REGION_IO_FDS)
    index: int

    def _natural_argsz(self) -> int:
        return _IO_FDS.size

    def encode_payload(self) -> bytes:
        return _IO_FDS.pack(self._wire_argsz(), 0, self.index, 0)

    @classmethod
    def _decode_payload(cls, payload: bytes) -> Self:
        argsz, _flags, index, _count = _unpack(_IO_FDS, payload, "DEVICE_GET_REGION_IO_FDS")
        return cls(argsz=argsz, index=index)


# --- DEVICE_GET_IRQ_INFO / DEVICE_SET_IRQS ------------------------------------------

_IRQ_INFO = struct.Struct("=IIII")
_IRQ_SET = struct.Struct("=IIIII")


@dataclass(frozen=True, kw_only=True)
class IrqInfoReply(_Sized, Reply):
    """How many interrupts of type ``index`` exist and how they behave (``IrqInfoFlag``)."""

    command: int = _fixed(Command.DEVICE_GET_IRQ_INFO)
    index: int
    flags: int
    count: int

    def _natural_argsz(self) -> int:
        return _IRQ_INFO.size

    def encode_payload(self) -> bytes:
        return _IRQ_INFO.pack(self._wire_argsz(), self.flags, self.index, self.count)

    @classmethod
    def _decode_payload(cls, payload: bytes) -> Self:
        argsz, flags, index, count = _unpack(_IRQ_INFO, payload, "DEVICE_GET_IRQ_INFO")
        return cls(argsz=argsz, flags=IrqInfoFlag(flags), index=index, count=count)


@dataclass(frozen=True, kw_only=True)
class IrqInfoRequest(_Sized, Request[IrqInfoReply]):
    """Ask about interrupt type ``index`` (``IrqIndex`` for PCI)."""

    command: int = _fixed(Command.DEVICE_GET_IRQ_INFO)
    index: int

    def _natural_argsz(self) -> int:
        return _IRQ_INFO.size

    def encode_payload(self) -> bytes:
        return _IRQ_INFO.pack(self._wire_argsz(), 0, self.index, 0)

    @classmethod
    def _decode_payload(cls, payload: bytes) -> Self:
        argsz, _flags, index, _count = _unpack(_IRQ_INFO, payload, "DEVICE_GET_IRQ_INFO")
        return cls(argsz=argsz, index=index)


@dataclass(frozen=True, kw_only=True)
class SetIrqsReply(Reply):
    """SET_IRQS succeeded; no payload."""

    command: int = _fixed(Command.DEVICE_SET_IRQS)

    def encode_payload(self) -> bytes:
        return b""

    @classmethod
    def _decode_payload(cls, payload: bytes) -> Self:
        return cls()


@dataclass(frozen=True, kw_only=True)
class SetIrqsRequest(_Sized, Request[SetIrqsReply]):
    """Apply an action (``IrqSetFlag.ACTION_*``) to interrupts [start, start+count).

    ``data`` holds one byte per interrupt with ``DATA_BOOL``; eventfds for
    ``DATA_EVENTFD`` travel in ``fds``.
    """

    command: int = _fixed(Command.DEVICE_SET_IRQS)
    flags: int
    index: int
    start: int
    count: int
    data: bytes = b""

    def _natural_argsz(self) -> int:
        return _IRQ_SET.size + len(self.data)

    def encode_payload(self) -> bytes:
        fixed = _IRQ_SET.pack(self._wire_argsz(), self.flags, self.index, self.start, self.count)
        return fixed + self.data

    @classmethod
    def _decode_payload(cls, payload: bytes) -> Self:
        argsz, flags, index, start, count = _unpack(_IRQ_SET, payload, "DEVICE_SET_IRQS")
        data = b""
        if flags & IrqSetFlag.DATA_BOOL:
            data = _data(payload, _IRQ_SET.size, count, "DEVICE_SET_IRQS")
        return cls(
            argsz=argsz,
            flags=IrqSetFlag(flags),
            index=index,
            start=start,
            count=count,
            data=data,
        )


# --- REGION_READ / REGION_WRITE -------------------------------------------------------

_REGION_ACCESS = struct.Struct("=QII")


@dataclass(frozen=True, kw_only=True)
class RegionReadReply(Reply):
    """The bytes read; their length is the wire's ``count``."""

    command: int = _fixed(Command.REGION_READ)
    region: int
    offset: int
    data: bytes

    def encode_payload(self) -> bytes:
        return _REGION_ACCESS.pack(self.offset, self.region, len(self.data)) + self.data

    @classmethod
    def _decode_payload(cls, payload: bytes) -> Self:
        offset, region, count = _unpack(_REGION_ACCESS, payload, "REGION_READ")
        data = _data(payload, _REGION_ACCESS.size, count, "REGION_READ")
        return cls(region=region, offset=offset, data=data)


@dataclass(frozen=True, kw_only=True)
class RegionReadRequest(Request[RegionReadReply]):
    """Read ``count`` bytes at ``offset`` of region ``region``."""

    command: int = _fixed(Command.REGION_READ)
    region: int
    offset: int
    count: int

    def encode_payload(self) -> bytes:
        return _REGION_ACCESS.pack(self.offset, self.region, self.count)

    @classmethod
    def _decode_payload(cls, payload: bytes) -> Self:
        offset, region, count = _unpack(_REGION_ACCESS, payload, "REGION_READ")
        return cls(region=region, offset=offset, count=count)


@dataclass(frozen=True, kw_only=True)
class RegionWriteReply(Reply):
    """How many bytes were written."""

    command: int = _fixed(Command.REGION_WRITE)
    region: int
    offset: int
    count: int

    def encode_payload(self) -> bytes:
        return _REGION_ACCESS.pack(self.offset, self.region, self.count)

    @classmethod
    def _decode_payload(cls, payload: bytes) -> Self:
        offset, region, count = _unpack(_REGION_ACCESS, payload, "REGION_WRITE")
        return cls(region=region, offset=offset, count=count)


@dataclass(frozen=True, kw_only=True)
class RegionWriteRequest(Request[RegionWriteReply]):
    """Write ``data`` at ``offset`` of region ``region``; ``no_reply`` makes it posted."""

    command: int = _fixed(Command.REGION_WRITE)
    region: int
    offset: int
    data: bytes

    def encode_payload(self) -> bytes:
        return _REGION_ACCESS.pack(self.offset, self.region, len(self.data)) + self.data

    @classmethod
    def _decode_payload(cls, payload: bytes) -> Self:
        offset, region, count = _unpack(_REGION_ACCESS, payload, "REGION_WRITE")
        data = _data(payload, _REGION_ACCESS.size, count, "REGION_WRITE")
        return cls(region=region, offset=offset, data=data)


# --- DMA_READ / DMA_WRITE (server -> client) -----------------------------------------

_DMA_ACCESS = struct.Struct("=QQ")
# The spec's table gives DMA_WRITE's reply a 4-byte count; libvfio-user (and
# its struct) use 8.  Both are accepted, 8 is sent.
_DMA_WRITE_REPLY_SHORT = struct.Struct("=QI")


@dataclass(frozen=True, kw_only=True)
class DmaReadReply(Reply):
    """The client memory read; its length is the wire's ``count``."""

    command: int = _fixed(Command.DMA_READ)
    address: int
    data: bytes

    def encode_payload(self) -> bytes:
        return _DMA_ACCESS.pack(self.address, len(self.data)) + self.data

    @classmethod
    def _decode_payload(cls, payload: bytes) -> Self:
        address, count = _unpack(_DMA_ACCESS, payload, "DMA_READ")
        return cls(address=address, data=_data(payload, _DMA_ACCESS.size, count, "DMA_READ"))


@dataclass(frozen=True, kw_only=True)
class DmaReadRequest(Request[DmaReadReply]):
    """The server reads ``count`` bytes of client memory at ``address``."""

    command: int = _fixed(Command.DMA_READ)
    address: int
    count: int

    def encode_payload(self) -> bytes:
        return _DMA_ACCESS.pack(self.address, self.count)

    @classmethod
    def _decode_payload(cls, payload: bytes) -> Self:
        address, count = _unpack(_DMA_ACCESS, payload, "DMA_READ")
        return cls(address=address, count=count)


@dataclass(frozen=True, kw_only=True)
class DmaWriteReply(Reply):
    """How many bytes of client memory were written."""

    command: int = _fixed(Command.DMA_WRITE)
    address: int
    count: int

    def encode_payload(self) -> bytes:
        return _DMA_ACCESS.pack(self.address, self.count)

    @classmethod
    def _decode_payload(cls, payload: bytes) -> Self:
        layout = _DMA_ACCESS if len(payload) >= _DMA_ACCESS.size else _DMA_WRITE_REPLY_SHORT
        address, count = _unpack(layout, payload, "DMA_WRITE")
        return cls(address=address, count=count)


@dataclass(frozen=True, kw_only=True)
class DmaWriteRequest(Request[DmaWriteReply]):
    """The server writes ``data`` into client memory at ``address``."""

    command: int = _fixed(Command.DMA_WRITE)
    address: int
    data: bytes

    def encode_payload(self) -> bytes:
        return _DMA_ACCESS.pack(self.address, len(self.data)) + self.data

    @classmethod
    def _decode_payload(cls, payload: bytes) -> Self:
        address, count = _unpack(_DMA_ACCESS, payload, "DMA_WRITE")
        return cls(address=address, data=_data(payload, _DMA_ACCESS.size, count, "DMA_WRITE"))


# --- DEVICE_RESET ---------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class DeviceResetReply(Reply):
    """The reset completed; no payload."""

    command: int = _fixed(Command.DEVICE_RESET)

    def encode_payload(self) -> bytes:
        return b""

    @classmethod
    def _decode_payload(cls, payload: bytes) -> Self:
        return cls()


@dataclass(frozen=True, kw_only=True)
class DeviceResetRequest(Request[DeviceResetReply]):
    """Reset the device; may take arbitrarily long."""

    command: int = _fixed(Command.DEVICE_RESET)

    def encode_payload(self) -> bytes:
        return b""

    @classmethod
    def _decode_payload(cls, payload: bytes) -> Self:
        return cls()


# --- REGION_WRITE_MULTI ---------------------------------------------------------------

_WRITE_COUNT = struct.Struct("=Q")
_MULTI_WRITE = struct.Struct("=QII8s")
#: A coalesced write carries at most this many data bytes.
MULTI_WRITE_MAX_DATA = 8


@dataclass(frozen=True)
class MultiWrite:
    """One coalesced write of at most eight bytes."""

    region: int
    offset: int
    data: bytes


@dataclass(frozen=True, kw_only=True)
class RegionWriteMultiReply(Reply):
    """How many of the coalesced writes completed."""

    command: int = _fixed(Command.REGION_WRITE_MULTI)
    count: int

    def encode_payload(self) -> bytes:
        return _WRITE_COUNT.pack(self.count)

    @classmethod
    def _decode_payload(cls, payload: bytes) -> Self:
        (count,) = _unpack(_WRITE_COUNT, payload, "REGION_WRITE_MULTI")
        return cls(count=count)


@dataclass(frozen=True, kw_only=True)
class RegionWriteMultiRequest(Request[RegionWriteMultiReply]):
    """Several small writes in one message (needs the ``write_multiple`` capability)."""

    command: int = _fixed(Command.REGION_WRITE_MULTI)
    writes: tuple[MultiWrite, ...]

    def encode_payload(self) -> bytes:
        parts = [_WRITE_COUNT.pack(len(self.writes))]
        for write in self.writes:
            if len(write.data) > MULTI_WRITE_MAX_DATA:
                raise LocalProtocolError(
                    f"a coalesced write carries at most {MULTI_WRITE_MAX_DATA} bytes, not {len(write.data)}",
                    EINVAL,
                )
            parts.append(_MULTI_WRITE.pack(write.offset, write.region, len(write.data), write.data))
        return b"".join(parts)

    @classmethod
    def _decode_payload(cls, payload: bytes) -> Self:
        (count,) = _unpack(_WRITE_COUNT, payload, "REGION_WRITE_MULTI")
        writes = []
        for i in range(count):
            at = _WRITE_COUNT.size + i * _MULTI_WRITE.size
            offset, region, size, data = _unpack(_MULTI_WRITE, payload, "REGION_WRITE_MULTI", at)
            if size > MULTI_WRITE_MAX_DATA:
                raise RemoteProtocolError(
                    f"coalesced write {i} claims {size} bytes, at most {MULTI_WRITE_MAX_DATA} fit",
                    EINVAL,
                )
            writes.append(MultiWrite(region=region, offset=offset, data=data[:size]))
        return cls(writes=tuple(writes))


# --- DEVICE_FEATURE -----------------------------------------------------------------

_FEATURE = struct.Struct("=II")


@dataclass(frozen=True, kw_only=True)
class _FeaturePayload(_Sized):
    """``flags`` = feature index (low 16 bits) | ``FeatureFlag``; data is feature-specific."""

    flags: int
    data: bytes = b""

    @property
    def feature(self) -> int:
        """The feature index (``Feature``)."""
        return self.flags & FEATURE_INDEX_MASK

    def _natural_argsz(self) -> int:
        return _FEATURE.size + len(self.data)

    def encode_payload(self) -> bytes:
        return _FEATURE.pack(self._wire_argsz(), self.flags) + self.data

    @classmethod
    def _decode_payload(cls, payload: bytes) -> Self:
        argsz, flags = _unpack(_FEATURE, payload, "DEVICE_FEATURE")
        return cls(argsz=argsz, flags=FeatureFlag(flags), data=bytes(payload[_FEATURE.size :]))


@dataclass(frozen=True, kw_only=True)
class DeviceFeatureReply(_FeaturePayload, Reply):
    """The request echoed, plus the feature's data for a GET."""

    command: int = _fixed(Command.DEVICE_FEATURE)


@dataclass(frozen=True, kw_only=True)
class DeviceFeatureRequest(_FeaturePayload, Request[DeviceFeatureReply]):
    """GET, SET or PROBE a device feature (migration, DMA logging)."""

    command: int = _fixed(Command.DEVICE_FEATURE)


# --- MIG_DATA_READ / MIG_DATA_WRITE -------------------------------------------------

_MIG_DATA = struct.Struct("=II")


@dataclass(frozen=True, kw_only=True)
class MigDataReadReply(_Sized, Reply):
    """Migration data; fewer bytes than asked means the stream is drained."""

    command: int = _fixed(Command.MIG_DATA_READ)
    data: bytes

    def _natural_argsz(self) -> int:
        return _MIG_DATA.size + len(self.data)

    def encode_payload(self) -> bytes:
        return _MIG_DATA.pack(self._wire_argsz(), len(self.data)) + self.data

    @classmethod
    def _decode_payload(cls, payload: bytes) -> Self:
        argsz, size = _unpack(_MIG_DATA, payload, "MIG_DATA_READ")
        return cls(argsz=argsz, data=_data(payload, _MIG_DATA.size, size, "MIG_DATA_READ"))


@dataclass(frozen=True, kw_only=True)
class MigDataReadRequest(_Sized, Request[MigDataReadReply]):
    """Read up to ``size`` bytes of migration data from a saving device."""

    command: int = _fixed(Command.MIG_DATA_READ)
    size: int

    def _natural_argsz(self) -> int:
        return _MIG_DATA.size + self.size

    def encode_payload(self) -> bytes:
        return _MIG_DATA.pack(self._wire_argsz(), self.size)

    @classmethod
    def _decode_payload(cls, payload: bytes) -> Self:
        argsz, size = _unpack(_MIG_DATA, payload, "MIG_DATA_READ")
        return cls(argsz=argsz, size=size)


@dataclass(frozen=True, kw_only=True)
class MigDataWriteReply(Reply):
    """The migration data was accepted; no payload."""

    command: int = _fixed(Command.MIG_DATA_WRITE)

    def encode_payload(self) -> bytes:
        return b""

    @classmethod
    def _decode_payload(cls, payload: bytes) -> Self:
        return cls()


@dataclass(frozen=True, kw_only=True)
class MigDataWriteRequest(_Sized, Request[MigDataWriteReply]):
    """Feed migration data to a resuming device."""

    command: int = _fixed(Command.MIG_DATA_WRITE)
    data: bytes

    def _natural_argsz(self) -> int:
        return _MIG_DATA.size + len(self.data)

    def encode_payload(self) -> bytes:
        return _MIG_DATA.pack(self._wire_argsz(), len(self.data)) + self.data

    @classmethod
    def _decode_payload(cls, payload: bytes) -> Self:
        argsz, size = _unpack(_MIG_DATA, payload, "MIG_DATA_WRITE")
        return cls(argsz=argsz, data=_data(payload, _MIG_DATA.size, size, "MIG_DATA_WRITE"))


# --- dispatch -------------------------------------------------------------------------

#: The typed request class of each command.
REQUEST_TYPES: dict[int, type[Request[Any]]] = {
    cls.command: cls
    for cls in (
        VersionRequest,
        DmaMapRequest,
        DmaUnmapRequest,
        DeviceInfoRequest,
        RegionInfoRequest,
        RegionIoFdsRequest,
        IrqInfoRequest,
        SetIrqsRequest,
        RegionReadRequest,
        RegionWriteRequest,
        DmaReadRequest,
        DmaWriteRequest,
        DeviceResetRequest,
        RegionWriteMultiRequest,
        DeviceFeatureRequest,
        MigDataReadRequest,
        MigDataWriteRequest,
    )
}

#: The typed reply class of each command.
REPLY_TYPES: dict[int, type[Reply]] = {
    cls.command: cls
    for cls in (
        VersionReply,
        DmaMapReply,
        DmaUnmapReply,
        DeviceInfoReply,
        RegionInfoReply,
        RegionIoFdsReply,
        IrqInfoReply,
        SetIrqsReply,
        RegionReadReply,
        RegionWriteReply,
        DmaReadReply,
        DmaWriteReply,
        DeviceResetReply,
        RegionWriteMultiReply,
        DeviceFeatureReply,
        MigDataReadReply,
        MigDataWriteReply,
    )
}


MessageT = TypeVar("MessageT", bound=Message)


def _normalized(message: MessageT) -> MessageT:
    """Fold a wire ``argsz`` equal to the natural size back into ``None``."""
    if isinstance(message, _Sized) and message.argsz == message._natural_argsz():
        return dataclasses.replace(message, argsz=None)
    return message


def decode_message(header: Header, payload: bytes, fds: tuple[int, ...] = ()) -> Message:
    """Turn a header, its payload and the fds that came with it into a message.

    Raises ``RemoteProtocolError`` carrying ``header`` and ``fds`` when the
    payload is malformed: the message is spent, the stream still in sync.
    """
    command = as_command(header.command)
    try:
        if header.type == MessageType.REPLY:
            if header.is_error:
                return ErrorReply(
                    command=command,
                    errno=header.error,
                    payload=payload,
                    msg_id=header.msg_id,
                    fds=fds,
                )
            reply_type = REPLY_TYPES.get(header.command)
            if reply_type is None:
                return RawReply(command=command, payload=payload, msg_id=header.msg_id, fds=fds)
            return dataclasses.replace(_normalized(reply_type._decode_payload(payload)), msg_id=header.msg_id, fds=fds)
        if header.type == MessageType.COMMAND:
            request_type = REQUEST_TYPES.get(header.command)
            if request_type is None:
                return RawRequest(
                    command=command,
                    payload=payload,
                    msg_id=header.msg_id,
                    fds=fds,
                    no_reply=header.no_reply,
                )
            return dataclasses.replace(
                _normalized(request_type._decode_payload(payload)),
                msg_id=header.msg_id,
                fds=fds,
                no_reply=header.no_reply,
            )
        raise RemoteProtocolError(f"unknown message type {header.type}", EINVAL)
    except RemoteProtocolError as exc:
        exc.header = header
        exc.fds = fds
        raise
