# Rules of this module:
#
# * Every vfio-user message starts with a 16-byte header in host byte order:
#   msg_id u16, command u16, size u32 (whole message, header included),
#   flags u32, error u32.
# * Flags bits 0-3 hold the type (0 command, 1 reply); bit 4 (0x10) is
#   NO_REPLY, bit 5 (0x20) is ERROR.  Other bits are reserved and ignored on
#   receipt, as are NO_REPLY on a reply and ERROR on a command.
# * Decoding checks only what the header alone can tell: a size smaller than
#   the header itself.  Whether the size is acceptable, and what the command
#   means, is for the framing and message layers.
"""The fixed 16-byte message header and the command numbers."""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from errno import EINVAL

from vdev.protocol.errors import LocalProtocolError, RemoteProtocolError

#: Size of the header that precedes every message.
HEADER_SIZE = 16

_HEADER = struct.Struct("=HHIII")


class Command(enum.IntEnum):
    """Command numbers, named as in the spec without the ``VFIO_USER_`` prefix."""

    VERSION = 1
    DMA_MAP = 2
    DMA_UNMAP = 3
    DEVICE_GET_INFO = 4
    DEVICE_GET_REGION_INFO = 5
    DEVICE_GET_REGION_IO_FDS = 6
    DEVICE_GET_IRQ_INFO = 7
    DEVICE_SET_IRQS = 8
    REGION_READ = 9
    REGION_WRITE = 10
    DMA_READ = 11
    DMA_WRITE = 12
    DEVICE_RESET = 13
    #: Not in the spec: older libvfio-user (the one QEMU bundles) still uses
    #: it for migration dirty-page logging.  It has no typed message.
    DIRTY_PAGES = 14
    REGION_WRITE_MULTI = 15
    DEVICE_FEATURE = 16
    MIG_DATA_READ = 17
    MIG_DATA_WRITE = 18


def as_command(command: int) -> int:
    """``command`` as a ``Command`` member when known, so reprs read well."""
    try:
        return Command(command)
    except ValueError:
        return command


class MessageType(enum.IntEnum):
    """The type bits (0-3) of the header flags."""

    COMMAND = 0
    REPLY = 1


#: Mask of the type bits in the header flags.
TYPE_MASK = 0x0F
#: The command needs no reply.
FLAG_NO_REPLY = 0x10
#: The reply reports an error; the header's error field holds the errno.
FLAG_ERROR = 0x20


@dataclass(frozen=True, slots=True)
class Header:
    """A decoded message header, exactly as it was on the wire."""

    msg_id: int
    command: int
    size: int
    flags: int
    error: int = 0

    @property
    def type(self) -> int:
        """The message type bits; compare with ``MessageType``."""
        return self.flags & TYPE_MASK

    @property
    def is_reply(self) -> bool:
        return self.type == MessageType.REPLY

    @property
    def no_reply(self) -> bool:
        """A command that must not be answered (meaningless on a reply)."""
        return not self.is_reply and bool(self.flags & FLAG_NO_REPLY)

    @property
    def is_error(self) -> bool:
        """A reply that reports a failure (meaningless on a command)."""
        return self.is_reply and bool(self.flags & FLAG_ERROR)

    @property
    def payload_size(self) -> int:
        return self.size - HEADER_SIZE

    def encode(self) -> bytes:
        """The 16 header bytes; fields that do not fit are a local error."""
        try:
            return _HEADER.pack(self.msg_id, self.command, self.size, self.flags, self.error)
        except struct.error as exc:
            raise LocalProtocolError(f"header field out of range in {self}: {exc}", EINVAL) from exc

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview) -> Header:
        """Parse the first 16 bytes of ``data``.

        The caller must supply at least ``HEADER_SIZE`` bytes; a size field
        smaller than the header is the peer's fault, and the stream cannot be
        resynchronised after it.
        """
        header = cls(*_HEADER.unpack_from(data))
        if header.size < HEADER_SIZE:
            raise RemoteProtocolError(
                f"message size {header.size} is smaller than the {HEADER_SIZE}-byte header",
                EINVAL,
            )
        return header
