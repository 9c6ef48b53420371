"""The proxy's framing: original bytes out, fds with their frame, pass-through once framing is lost."""

from __future__ import annotations

import os
import struct

from vdev.protocol import (
    NEED_DATA,
    ConnectionClosed,
    DmaMapRequest,
    RegionReadReply,
    RegionReadRequest,
    SetIrqsRequest,
)
from vdev.proxy import Frame, FrameReader, Unframed, describe_fd
from vdev.proxy._fds import FdInfo, close_fds, create_fd


def drain(reader: FrameReader) -> list[object]:
    items: list[object] = []
    while (item := reader.next_frame()) is not NEED_DATA:
        items.append(item)
        if isinstance(item, ConnectionClosed):
            break
    return items


def test_frames_come_out_byte_for_byte_with_their_fds() -> None:
    first = RegionReadRequest(msg_id=1, region=7, offset=0, count=2).encode()
    # A reserved flag bit that re-encoding would lose.
    second = bytearray(SetIrqsRequest(msg_id=2, flags=0x24, index=1, start=0, count=1).encode())
    struct.pack_into("=I", second, 8, 0x0100_0000)
    reader = FrameReader()
    stream = first + bytes(second)
    reader.receive_data(stream[:10])
    assert reader.next_frame() is NEED_DATA
    reader.receive_data(stream[10:], fds=(42,))
    one, two = drain(reader)
    assert isinstance(one, Frame) and isinstance(two, Frame)
    assert (one.data, one.fds) == (first, ())
    assert (two.data, two.fds) == (bytes(second), (42,))
    assert isinstance(two.message, SetIrqsRequest)


def test_a_malformed_payload_is_still_a_frame() -> None:
    good = RegionReadReply(msg_id=3, region=0, offset=0, data=b"abcd").encode()
    bad = bytearray(good)
    struct.pack_into("=I", bad, 4, 20)  # size cut to 20: the data no longer fits
    reader = FrameReader()
    reader.receive_data(bytes(bad[:20]) + good)
    broken, fine = drain(reader)
    assert isinstance(broken, Frame) and broken.message is None and broken.error is not None
    assert broken.data == bytes(bad[:20])
    assert isinstance(fine, Frame) and fine.data == good


def test_lost_framing_turns_into_pass_through() -> None:
    reader = FrameReader()
    garbage = struct.pack("=HHIII", 1, 1, 4, 0, 0) + b"tail"  # size 4 < header
    reader.receive_data(garbage, fds=(7,))
    (item,) = drain(reader)
    assert isinstance(item, Unframed) and item.data == garbage and item.fds == (7,)
    assert "smaller than the 16-byte header" in item.reason
    reader.receive_data(b"more bytes")
    reader.receive_data(b"")
    assert drain(reader) == [Unframed(b"more bytes", (), item.reason), ConnectionClosed()]


def test_an_oversized_claim_is_passed_through_not_buffered() -> None:
    reader = FrameReader(max_frame_size=1024)
    head = struct.pack("=HHIII", 1, 9, 1 << 20, 1, 0)
    reader.receive_data(head)
    (item,) = drain(reader)
    assert isinstance(item, Unframed) and item.data == head


def test_a_stream_ending_inside_a_message_hands_out_the_partial_bytes() -> None:
    data = DmaMapRequest(msg_id=4, address=0, size=4096).encode()
    reader = FrameReader()
    reader.receive_data(data[:20], fds=(5,))
    assert reader.next_frame() is NEED_DATA
    reader.receive_data(b"")
    partial, closed = drain(reader)
    assert isinstance(partial, Unframed) and partial.data == data[:20] and partial.fds == (5,)
    assert isinstance(closed, ConnectionClosed)


def test_fd_kinds_are_described_and_recreated() -> None:
    for info in (FdInfo("memfd", 8192), FdInfo("eventfd"), FdInfo("socket"), FdInfo("pipe")):
        fd, extra = create_fd(info)
        try:
            described = describe_fd(fd)
            assert described.kind == info.kind
            assert described.size == info.size
        finally:
            close_fds((fd, *extra))
    path_fd = os.open(__file__, os.O_RDONLY)
    try:
        assert describe_fd(path_fd) == FdInfo("file", os.path.getsize(__file__))
    finally:
        os.close(path_fd)
    assert FdInfo.from_dict(FdInfo("memfd", 4096).to_dict()) == FdInfo("memfd", 4096)
