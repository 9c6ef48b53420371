"""The 16-byte header: layout, flag bits, and what it rejects on its own."""

from __future__ import annotations

import errno
import struct

import pytest

from vdev.protocol import (
    FLAG_ERROR,
    FLAG_NO_REPLY,
    HEADER_SIZE,
    Command,
    Header,
    LocalProtocolError,
    MessageType,
    RemoteProtocolError,
)
from vdev.protocol.header import as_command


def test_layout_matches_the_spec_table() -> None:
    header = Header(msg_id=0x1234, command=Command.REGION_WRITE, size=40, flags=FLAG_NO_REPLY)
    assert header.encode() == struct.pack("=HHIII", 0x1234, 10, 40, 0x10, 0)
    assert len(header.encode()) == HEADER_SIZE


def test_decode_round_trips_and_reads_flags() -> None:
    wire = struct.pack("=HHIII", 7, 9, 16, MessageType.REPLY | FLAG_ERROR, errno.EINVAL)
    header = Header.decode(wire)
    assert header == Header(msg_id=7, command=9, size=16, flags=0x21, error=errno.EINVAL)
    assert header.is_reply and header.is_error and not header.no_reply
    assert header.payload_size == 0
    assert header.encode() == wire


def test_flags_that_do_not_apply_to_the_type_are_ignored() -> None:
    command_with_error_bit = Header(msg_id=0, command=1, size=16, flags=FLAG_ERROR)
    reply_with_no_reply_bit = Header(msg_id=0, command=1, size=16, flags=1 | FLAG_NO_REPLY)
    assert not command_with_error_bit.is_error
    assert not reply_with_no_reply_bit.no_reply


def test_reserved_flag_bits_do_not_change_the_type() -> None:
    header = Header.decode(struct.pack("=HHIII", 0, 1, 16, 0xFFFF_FF00 | 1, 0))
    assert header.type == MessageType.REPLY


@pytest.mark.parametrize("size", [0, 1, 15])
def test_a_size_below_the_header_is_a_remote_error(size: int) -> None:
    with pytest.raises(RemoteProtocolError) as caught:
        Header.decode(struct.pack("=HHIII", 0, 1, size, 0, 0))
    assert caught.value.errno == errno.EINVAL
    assert caught.value.header is None


@pytest.mark.parametrize(
    "fields",
    [
        {"msg_id": 0x10000, "command": 1, "size": 16, "flags": 0},
        {"msg_id": 0, "command": -1, "size": 16, "flags": 0},
        {"msg_id": 0, "command": 1, "size": 1 << 32, "flags": 0},
    ],
)
def test_fields_that_do_not_fit_are_a_local_error(fields: dict[str, int]) -> None:
    with pytest.raises(LocalProtocolError) as caught:
        Header(**fields).encode()
    assert caught.value.errno == errno.EINVAL


def test_known_commands_print_by_name() -> None:
    assert as_command(13) is Command.DEVICE_RESET
    assert as_command(99) == 99
