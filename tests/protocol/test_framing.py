"""Framing: partial reads, fds staying with their message, end of stream, fatal errors."""

from __future__ import annotations

import doctest
import errno
import struct

import pytest

import vdev.protocol
import vdev.protocol.framing
from vdev.protocol import (
    HEADER_SIZE,
    NEED_DATA,
    Connection,
    ConnectionClosed,
    DeviceResetRequest,
    DmaMapRequest,
    DmaReadReply,
    DmaReadRequest,
    Event,
    RegionReadReply,
    RegionReadRequest,
    RegionWriteRequest,
    RemoteProtocolError,
    SetIrqsRequest,
)


def drain(conn: Connection) -> list[Event]:
    events: list[Event] = []
    while (event := conn.next_event()) is not NEED_DATA:
        events.append(event)
        if isinstance(event, ConnectionClosed):
            break
    return events


def test_doctests_run() -> None:
    for module in (vdev.protocol, vdev.protocol.framing):
        assert doctest.testmod(module).failed == 0


def test_a_message_fed_byte_by_byte_appears_once_complete() -> None:
    message = RegionWriteRequest(msg_id=3, region=0, offset=4, data=b"abcd", fds=(10,))
    data, fds = Connection().send(message)
    conn = Connection()
    for position in range(len(data)):
        assert conn.next_event() is NEED_DATA
        conn.receive_data(data[position : position + 1], fds if position == 0 else ())
    assert conn.next_event() == message
    assert conn.next_event() is NEED_DATA
    assert conn.buffered == 0


def test_several_messages_in_one_read_come_out_in_order() -> None:
    messages = [RegionReadRequest(msg_id=i, region=0, offset=i * 4, count=4) for i in range(5)]
    conn = Connection()
    conn.receive_data(b"".join(m.encode() for m in messages))
    assert drain(conn) == messages


def test_fds_stay_with_the_message_whose_bytes_they_came_with() -> None:
    plain = RegionReadRequest(msg_id=1, region=0, offset=0, count=4)
    mapped = DmaMapRequest(msg_id=2, address=0x1000, size=0x1000, fds=(7,))
    irqs = SetIrqsRequest(msg_id=3, flags=0x24, index=0, start=0, count=2, fds=(8, 9))
    conn = Connection()
    wire_plain, wire_mapped, wire_irqs = (m.encode() for m in (plain, mapped, irqs))
    # A read may glue a plain message in front of the start of one with fds
    # (the kernel stops the read inside the DMA_MAP, whose fds it delivers).
    conn.receive_data(wire_plain + wire_mapped[:3], (7,))
    assert drain(conn) == [plain]
    conn.receive_data(wire_mapped[3:])
    assert drain(conn) == [mapped]
    # Fds that arrive with a chunk starting mid-message still belong to it.
    conn.receive_data(wire_irqs[:20])
    conn.receive_data(wire_irqs[20:], (8, 9))
    assert drain(conn) == [irqs]


def test_fds_go_to_the_last_message_of_a_glued_read() -> None:
    first = DmaMapRequest(msg_id=1, address=0, size=0x1000)
    second = DmaMapRequest(msg_id=2, address=0x1000, size=0x1000, fds=(5,))
    conn = Connection()
    conn.receive_data(first.encode() + second.encode(), (5,))
    assert drain(conn) == [first, second]


def test_clean_end_of_stream_is_an_event_forever() -> None:
    conn = Connection()
    conn.receive_data(DeviceResetRequest().encode())
    conn.receive_data(b"")
    assert drain(conn) == [DeviceResetRequest(), ConnectionClosed()]
    assert conn.next_event() == ConnectionClosed()
    with pytest.raises(RuntimeError):
        conn.receive_data(b"more")


def test_end_of_stream_inside_a_message_is_a_remote_error() -> None:
    conn = Connection()
    conn.receive_data(DmaMapRequest(address=0, size=1).encode()[:20], (6,))
    conn.receive_data(b"")
    with pytest.raises(RemoteProtocolError) as caught:
        conn.next_event()
    assert caught.value.errno == errno.ECONNRESET
    assert caught.value.fds == (6,)


def test_a_header_too_small_for_itself_kills_the_connection() -> None:
    conn = Connection()
    conn.receive_data(struct.pack("=HHIII", 1, 1, 8, 0, 0) + b"trailing", (4,))
    with pytest.raises(RemoteProtocolError) as caught:
        conn.next_event()
    assert caught.value.errno == errno.EINVAL
    assert caught.value.header is None
    assert caught.value.fds == (4,)
    with pytest.raises(RemoteProtocolError):
        conn.next_event()


def test_an_oversized_message_is_refused_before_buffering_it() -> None:
    conn = Connection(max_message_size=64)
    conn.receive_data(struct.pack("=HHIII", 1, 10, 65, 0, 0))
    with pytest.raises(RemoteProtocolError) as caught:
        conn.next_event()
    assert caught.value.errno == errno.EMSGSIZE
    conn.max_message_size = 1 << 20
    with pytest.raises(RemoteProtocolError):
        conn.next_event()


def test_a_malformed_payload_spends_only_its_own_message() -> None:
    bad = struct.pack("=HHIII", 5, 9, HEADER_SIZE + 3, 0, 0) + b"abc"
    good = DeviceResetRequest(msg_id=6)
    conn = Connection()
    conn.receive_data(bad, (3,))
    conn.receive_data(good.encode())
    with pytest.raises(RemoteProtocolError) as caught:
        conn.next_event()
    assert caught.value.header is not None and caught.value.header.msg_id == 5
    assert caught.value.fds == (3,)
    assert conn.next_event() == good


def test_fds_without_bytes_are_a_caller_error() -> None:
    with pytest.raises(ValueError):
        Connection().receive_data(b"", (3,))


def test_two_endpoints_talk_over_a_fake_link() -> None:
    """A client and a server end exchange a read and a DMA round trip."""
    client, server = Connection(), Connection()

    def carry(sender: Connection, receiver: Connection, message: object) -> list[Event]:
        assert isinstance(message, vdev.protocol.Message)
        data, fds = sender.send(message)
        for position in range(0, len(data), 7):
            receiver.receive_data(data[position : position + 7], fds if position == 0 else ())
        return drain(receiver)

    request = RegionReadRequest(msg_id=1, region=0, offset=0, count=2)
    assert carry(client, server, request) == [request]
    dma = DmaReadRequest(msg_id=1, address=0x4000, count=3)
    assert carry(server, client, dma) == [dma]
    dma_reply = DmaReadReply(msg_id=1, address=0x4000, data=b"xyz")
    assert carry(client, server, dma_reply) == [dma_reply]
    reply = RegionReadReply(msg_id=1, region=0, offset=0, data=b"ok")
    assert carry(server, client, reply) == [reply]
