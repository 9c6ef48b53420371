"""Typed messages: every command both ways, exact layouts, and malformed payloads."""

from __future__ import annotations

import errno
import struct

import pytest

from vdev.protocol import (
    HEADER_SIZE,
    REPLY_TYPES,
    REQUEST_TYPES,
    Capabilities,
    Command,
    DeviceFeatureReply,
    DeviceFeatureRequest,
    DeviceFlag,
    DeviceInfoReply,
    DeviceInfoRequest,
    DeviceResetReply,
    DeviceResetRequest,
    DeviceState,
    DmaFlag,
    DmaMapReply,
    DmaMapRequest,
    DmaReadReply,
    DmaReadRequest,
    DmaUnmapReply,
    DmaUnmapRequest,
    DmaWriteReply,
    DmaWriteRequest,
    ErrorReply,
    Feature,
    FeatureFlag,
    Header,
    IoFdType,
    IrqIndex,
    IrqInfoFlag,
    IrqInfoReply,
    IrqInfoRequest,
    IrqSetFlag,
    LocalProtocolError,
    Message,
    MigDataReadReply,
    MigDataReadRequest,
    MigDataWriteReply,
    MigDataWriteRequest,
    MigrationCapability,
    MultiWrite,
    RawReply,
    RawRequest,
    RegionFlag,
    RegionInfoReply,
    RegionInfoRequest,
    RegionIoFdsReply,
    RegionIoFdsRequest,
    RegionReadReply,
    RegionReadRequest,
    RegionTypeCapability,
    RegionWriteMultiReply,
    RegionWriteMultiRequest,
    RegionWriteReply,
    RegionWriteRequest,
    RemoteProtocolError,
    SetIrqsReply,
    SetIrqsRequest,
    SparseMmapArea,
    SparseMmapCapability,
    SubRegionFd,
    TwinSocket,
    UnknownRegionCapability,
    VersionReply,
    VersionRequest,
    decode_message,
)

SAMPLES: list[Message] = [
    VersionRequest(
        msg_id=1,
        major=0,
        minor=1,
        capabilities=Capabilities(
            max_msg_fds=16,
            max_data_xfer_size=1 << 20,
            pgsizes=4096,
            twin_socket=TwinSocket(supported=True),
            write_multiple=True,
        ),
    ),
    VersionRequest(major=0, minor=1),
    VersionReply(
        msg_id=1,
        major=0,
        minor=1,
        capabilities=Capabilities(
            max_msg_fds=8,
            migration=MigrationCapability(pgsize=4096),
            twin_socket=TwinSocket(supported=True, fd_index=0),
            extra={"vendor": {"x": [1, 2]}},
        ),
        fds=(9,),
    ),
    DmaMapRequest(msg_id=2, address=0x10000, size=0x4000, offset=0x1000, fds=(5,)),
    DmaMapRequest(address=0, size=0x1000, flags=DmaFlag.READ, argsz=64),
    DmaMapReply(msg_id=2),
    DmaUnmapRequest(msg_id=3, address=0x10000, size=0x4000),
    DmaUnmapReply(msg_id=3, address=0x10000, size=0x4000, flags=0),
    DeviceInfoRequest(msg_id=4),
    DeviceInfoRequest(argsz=1024),
    DeviceInfoReply(msg_id=4, flags=DeviceFlag.PCI | DeviceFlag.RESET, num_regions=9, num_irqs=5),
    RegionInfoRequest(msg_id=5, index=7),
    RegionInfoRequest(index=1, argsz=4096),
    RegionInfoReply(index=0, flags=RegionFlag.READ | RegionFlag.WRITE, size=0x100),
    RegionInfoReply(
        msg_id=5,
        index=1,
        flags=RegionFlag.READ | RegionFlag.WRITE | RegionFlag.MMAP,
        size=0x3000,
        offset=0x10000,
        capabilities=(
            RegionTypeCapability(type=3, subtype=1),
            SparseMmapCapability(areas=(SparseMmapArea(0, 0x1000), SparseMmapArea(0x2000, 0x1000))),
            UnknownRegionCapability(id=0x77, version=2, data=b"12345678"),
        ),
        fds=(11,),
    ),
    RegionInfoReply(index=1, flags=RegionFlag.READ, size=0x3000, argsz=80),
    RegionIoFdsRequest(msg_id=6, index=0),
    RegionIoFdsRequest(index=0, argsz=256),
    RegionIoFdsReply(
        msg_id=6,
        index=0,
        sub_regions=(
            SubRegionFd(offset=0x10, size=4, fd_index=0, type=IoFdType.IOEVENTFD, data=0xAB),
            SubRegionFd(offset=0x20, size=0, fd_index=1, type=IoFdType.IOREGIONFD, flags=2),
        ),
        fds=(3, 4),
    ),
    RegionIoFdsReply(index=0, count=3),
    IrqInfoRequest(msg_id=7, index=IrqIndex.MSIX),
    IrqInfoReply(msg_id=7, index=IrqIndex.MSIX, flags=IrqInfoFlag.EVENTFD, count=32),
    SetIrqsRequest(
        msg_id=8,
        flags=IrqSetFlag.DATA_EVENTFD | IrqSetFlag.ACTION_TRIGGER,
        index=IrqIndex.MSIX,
        start=0,
        count=2,
        fds=(20, 21),
    ),
    SetIrqsRequest(
        flags=IrqSetFlag.DATA_BOOL | IrqSetFlag.ACTION_MASK,
        index=IrqIndex.INTX,
        start=0,
        count=3,
        data=b"\x01\x00\x01",
    ),
    SetIrqsReply(msg_id=8),
    RegionReadRequest(msg_id=9, region=0, offset=0x40, count=4),
    RegionReadReply(msg_id=9, region=0, offset=0x40, data=b"\x01\x02\x03\x04"),
    RegionWriteRequest(msg_id=10, region=2, offset=8, data=b"\xff" * 8, no_reply=True),
    RegionWriteReply(msg_id=10, region=2, offset=8, count=8),
    DmaReadRequest(msg_id=11, address=0x10000, count=16),
    DmaReadReply(msg_id=11, address=0x10000, data=bytes(range(16))),
    DmaWriteRequest(msg_id=12, address=0x10004, data=b"dma!"),
    DmaWriteReply(msg_id=12, address=0x10004, count=4),
    DeviceResetRequest(msg_id=13),
    DeviceResetReply(msg_id=13),
    RegionWriteMultiRequest(
        msg_id=15,
        writes=(
            MultiWrite(region=0, offset=0, data=b"\x01"),
            MultiWrite(region=2, offset=0x100, data=b"12345678"),
        ),
    ),
    RegionWriteMultiReply(msg_id=15, count=2),
    DeviceFeatureRequest(msg_id=16, flags=FeatureFlag.GET | Feature.MIGRATION, argsz=16),
    DeviceFeatureReply(
        msg_id=16,
        flags=FeatureFlag.GET | Feature.MIG_DEVICE_STATE,
        data=struct.pack("=II", DeviceState.RUNNING, 0),
    ),
    MigDataReadRequest(msg_id=17, size=4096),
    MigDataReadReply(msg_id=17, data=b"state"),
    MigDataWriteRequest(msg_id=18, data=b"state"),
    MigDataWriteReply(msg_id=18),
    ErrorReply(msg_id=19, command=Command.REGION_READ, errno=errno.EINVAL),
    ErrorReply(msg_id=20, command=Command.REGION_READ, errno=0, payload=b"kept"),
    RawRequest(msg_id=21, command=99, payload=b"anything", fds=(7,)),
    RawRequest(command=Command.DIRTY_PAGES, payload=b"\x08\x00\x00\x00\x01\x00\x00\x00"),
    RawReply(msg_id=21, command=99, payload=b"answer"),
]


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips(message: Message) -> None:
    wire = message.encode()
    decoded = Message.decode(wire, message.fds)
    assert decoded == message
    assert type(decoded).decode(wire, message.fds) == message
    assert decoded.encode() == wire


def test_the_samples_cover_every_command_in_both_directions() -> None:
    sampled = {type(m) for m in SAMPLES}
    assert set(REQUEST_TYPES.values()) <= sampled
    assert set(REPLY_TYPES.values()) <= sampled
    spec_commands = set(Command) - {Command.DIRTY_PAGES}
    assert set(REQUEST_TYPES) == set(REPLY_TYPES) == spec_commands


@pytest.mark.parametrize(
    ("message", "payload"),
    [
        (
            DmaMapRequest(address=0x2000, size=0x1000, offset=0x40),
            struct.pack("=IIQQQ", 32, 3, 0x40, 0x2000, 0x1000),
        ),
        (DmaUnmapRequest(address=0x2000, size=0x1000), struct.pack("=IIQQ", 24, 0, 0x2000, 0x1000)),
        (DeviceInfoRequest(), struct.pack("=IIII", 16, 0, 0, 0)),
        (RegionInfoRequest(index=7), struct.pack("=IIIIQQ", 32, 0, 7, 0, 0, 0)),
        (RegionIoFdsRequest(index=1), struct.pack("=IIII", 16, 0, 1, 0)),
        (IrqInfoRequest(index=2), struct.pack("=IIII", 16, 0, 2, 0)),
        (
            SetIrqsRequest(flags=0x22, index=0, start=0, count=2, data=b"\x01\x00"),
            struct.pack("=IIIII", 22, 0x22, 0, 0, 2) + b"\x01\x00",
        ),
        (
            RegionWriteRequest(region=2, offset=8, data=b"ab"),
            struct.pack("=QII", 8, 2, 2) + b"ab",
        ),
        (DmaReadRequest(address=0x10, count=4), struct.pack("=QQ", 0x10, 4)),
        (DmaWriteReply(address=0x10, count=4), struct.pack("=QQ", 0x10, 4)),
        (
            RegionWriteMultiRequest(writes=(MultiWrite(region=1, offset=4, data=b"xy"),)),
            struct.pack("=QQII8s", 1, 4, 1, 2, b"xy"),
        ),
        (DeviceFeatureRequest(flags=0x10001), struct.pack("=II", 8, 0x10001)),
        (MigDataReadRequest(size=100), struct.pack("=II", 108, 100)),
        (MigDataWriteRequest(data=b"abc"), struct.pack("=II", 11, 3) + b"abc"),
        (DeviceResetRequest(), b""),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, Message) else "",
)
def test_payload_layout_matches_the_spec_tables(message: Message, payload: bytes) -> None:
    assert message.encode_payload() == payload


def test_header_of_an_encoded_message() -> None:
    wire = RegionReadRequest(msg_id=0xBEEF, region=0, offset=0, count=8, no_reply=True).encode()
    header = Header.decode(wire)
    assert header == Header(msg_id=0xBEEF, command=9, size=HEADER_SIZE + 16, flags=0x10)
    error = ErrorReply(msg_id=1, command=Command.DMA_MAP, errno=errno.EEXIST).encode()
    assert Header.decode(error) == Header(msg_id=1, command=2, size=16, flags=0x21, error=17)


def test_region_info_sets_the_caps_bit_only_when_it_carries_capabilities() -> None:
    bare = RegionInfoReply(index=0, flags=RegionFlag.READ | RegionFlag.CAPS, size=8)
    assert Header.decode(bare.encode()).size == HEADER_SIZE + 32
    assert struct.unpack_from("=II", bare.encode_payload()) == (32, RegionFlag.READ)
    sparse = SparseMmapCapability(areas=(SparseMmapArea(0, 0x1000),))
    with_caps = RegionInfoReply(index=1, flags=RegionFlag.MMAP, size=0x1000, capabilities=(sparse,))
    argsz, flags, _index, cap_offset = struct.unpack_from("=IIII", with_caps.encode_payload())
    assert (argsz, flags, cap_offset) == (32 + 8 + 8 + 16, RegionFlag.MMAP | RegionFlag.CAPS, 32)


def test_region_info_reply_truncated_by_a_small_argsz() -> None:
    # What libvfio-user sends when asked with argsz=40 for an 80-byte answer:
    # 40 bytes, no CAPS bit, zero filler, and argsz saying what would fit.
    payload = struct.pack("=IIIIQQ", 80, 7, 1, 0, 0x3000, 0) + bytes(8)
    reply = decode_message(Header(1, 5, HEADER_SIZE + len(payload), 1), payload)
    assert isinstance(reply, RegionInfoReply)
    assert reply.capabilities == () and reply.argsz == 80


def _region_info_with_chain(chain: bytes, cap_offset: int = 32) -> bytes:
    fixed = struct.pack("=IIIIQQ", 32 + len(chain), RegionFlag.CAPS, 1, cap_offset, 0x1000, 0)
    return fixed + chain


@pytest.mark.parametrize(
    ("payload", "problem"),
    [
        (_region_info_with_chain(struct.pack("=HHI", 0x99, 1, 32)), "loops"),
        (_region_info_with_chain(b"", cap_offset=16), "outside"),
        (_region_info_with_chain(b"", cap_offset=200), "outside"),
        (_region_info_with_chain(struct.pack("=HHIII", 1, 1, 0, 3, 0)), "sparse mmap areas"),
        (_region_info_with_chain(struct.pack("=HHI", 2, 1, 0) + b"\0\0"), "region type"),
    ],
    ids=["loop", "into-struct", "past-end", "short-sparse", "short-type"],
)
def test_broken_capability_chains_are_remote_errors(payload: bytes, problem: str) -> None:
    header = Header(9, Command.DEVICE_GET_REGION_INFO, HEADER_SIZE + len(payload), 1)
    with pytest.raises(RemoteProtocolError, match=problem) as caught:
        decode_message(header, payload, (4,))
    assert caught.value.errno == errno.EINVAL
    assert caught.value.header == header
    assert caught.value.fds == (4,)


def test_io_fds_entries_use_the_stride_that_argsz_implies() -> None:
    entry = struct.pack("=QQIIIIQ", 0x10, 4, 0, 0, 0, 0, 0x5A)
    padding = bytes(8)
    payload = struct.pack("=IIII", 16 + 2 * 48, 0, 0, 2) + (entry + padding) * 2
    reply = decode_message(Header(1, 6, HEADER_SIZE + len(payload), 1), payload)
    assert isinstance(reply, RegionIoFdsReply)
    assert [s.data for s in reply.sub_regions] == [0x5A, 0x5A]


def test_dma_write_reply_with_the_specs_four_byte_count() -> None:
    payload = struct.pack("=QI", 0x1000, 64)
    reply = decode_message(Header(1, 12, HEADER_SIZE + 12, 1), payload)
    assert reply == DmaWriteReply(msg_id=1, address=0x1000, count=64)


def test_data_beyond_count_is_ignored_as_libvfio_user_pads_dma_writes() -> None:
    payload = struct.pack("=QQ", 0x1000, 2) + b"ab" + bytes(14)
    request = decode_message(Header(1, 12, HEADER_SIZE + len(payload), 0), payload)
    assert request == DmaWriteRequest(msg_id=1, address=0x1000, data=b"ab")


def test_error_reply_wins_over_the_command_layout() -> None:
    # libvfio-user answers a failed REGION_READ with the error bit *and* a payload.
    payload = struct.pack("=QII", 0, 0, 4) + bytes(4)
    header = Header(3, Command.REGION_READ, HEADER_SIZE + len(payload), 0x21, errno.EINVAL)
    reply = decode_message(header, payload)
    assert reply == ErrorReply(msg_id=3, command=Command.REGION_READ, errno=22, payload=payload)


def test_unknown_commands_decode_raw_in_both_directions() -> None:
    request = decode_message(Header(1, 200, HEADER_SIZE + 3, 0x10), b"abc", (5,))
    assert request == RawRequest(msg_id=1, command=200, payload=b"abc", fds=(5,), no_reply=True)
    reply = decode_message(Header(1, 200, HEADER_SIZE, 1), b"")
    assert reply == RawReply(msg_id=1, command=200)


def test_no_reply_survives_decoding() -> None:
    message = RegionWriteRequest(region=0, offset=0, data=b"x", no_reply=True)
    decoded = Message.decode(message.encode())
    assert isinstance(decoded, RegionWriteRequest) and decoded.no_reply


@pytest.mark.parametrize(
    ("command", "is_reply", "payload"),
    [
        (Command.VERSION, False, b"\x00"),
        (Command.VERSION, True, struct.pack("=HH", 0, 1) + b'{"capabilities":{}}'),
        (Command.VERSION, False, struct.pack("=HH", 0, 1) + b"{nope}\0"),
        (Command.VERSION, False, struct.pack("=HH", 0, 1) + b"\xff\xfe\0"),
        (Command.VERSION, False, struct.pack("=HH", 0, 1) + b"[]\0"),
        (Command.VERSION, False, struct.pack("=HH", 0, 1) + b'{"capabilities":[]}\0'),
        (
            Command.VERSION,
            False,
            struct.pack("=HH", 0, 1) + b'{"capabilities":{"max_msg_fds":true}}\0',
        ),
        (
            Command.VERSION,
            False,
            struct.pack("=HH", 0, 1) + b'{"capabilities":{"max_data_xfer_size":-1}}\0',
        ),
        (
            Command.VERSION,
            False,
            struct.pack("=HH", 0, 1) + b'{"capabilities":{"write_multiple":1}}\0',
        ),
        (
            Command.VERSION,
            False,
            struct.pack("=HH", 0, 1) + b'{"capabilities":{"twin_socket":{"fd_index":"0"}}}\0',
        ),
        (Command.DMA_MAP, False, bytes(31)),
        (Command.DMA_UNMAP, True, bytes(8)),
        (Command.DEVICE_GET_INFO, True, bytes(15)),
        (Command.DEVICE_GET_REGION_INFO, False, bytes(4)),
        (Command.DEVICE_GET_IRQ_INFO, True, bytes(12)),
        (Command.DEVICE_SET_IRQS, False, struct.pack("=IIIII", 22, 0x22, 0, 0, 2) + b"\x01"),
        (Command.REGION_READ, True, struct.pack("=QII", 0, 0, 8) + b"short"),
        (Command.REGION_WRITE, False, struct.pack("=QII", 0, 0, 4) + b"ab"),
        (Command.DMA_READ, True, struct.pack("=QQ", 0, 4)),
        (Command.DMA_WRITE, True, bytes(11)),
        (Command.REGION_WRITE_MULTI, False, struct.pack("=Q", 2) + bytes(24)),
        (Command.REGION_WRITE_MULTI, False, struct.pack("=QQII8s", 1, 0, 0, 9, b"")),
        (Command.DEVICE_FEATURE, False, bytes(4)),
        (Command.MIG_DATA_READ, True, struct.pack("=II", 18, 10) + b"12345"),
        (Command.MIG_DATA_WRITE, False, bytes(7)),
    ],
)
def test_malformed_payloads_are_remote_errors_that_keep_the_header(
    command: Command, is_reply: bool, payload: bytes
) -> None:
    header = Header(42, command, HEADER_SIZE + len(payload), 1 if is_reply else 0)
    with pytest.raises(RemoteProtocolError) as caught:
        decode_message(header, payload, (8,))
    assert caught.value.errno == errno.EINVAL
    assert caught.value.header == header
    assert caught.value.fds == (8,)


def test_an_unknown_message_type_is_a_remote_error() -> None:
    header = Header(1, Command.DEVICE_RESET, HEADER_SIZE, 0x7)
    with pytest.raises(RemoteProtocolError, match="type 7") as caught:
        decode_message(header, b"")
    assert caught.value.header == header


def test_decode_insists_on_one_whole_message_of_the_asked_type() -> None:
    wire = DeviceResetRequest().encode()
    with pytest.raises(RemoteProtocolError, match="cannot hold a header"):
        Message.decode(wire[:10])
    with pytest.raises(RemoteProtocolError, match="header says 16"):
        Message.decode(wire + b"x")
    with pytest.raises(RemoteProtocolError, match="expected DeviceResetReply"):
        DeviceResetReply.decode(wire)


@pytest.mark.parametrize(
    "message",
    [
        RegionReadRequest(msg_id=0x10000, region=0, offset=0, count=4),
        RegionReadRequest(region=-1, offset=0, count=4),
        DmaMapRequest(address=1 << 64, size=1),
        SetIrqsRequest(flags=0, index=0, start=0, count=1 << 32),
        RegionWriteMultiRequest(writes=(MultiWrite(region=0, offset=0, data=b"123456789"),)),
    ],
    ids=lambda m: type(m).__name__,
)
def test_values_that_do_not_fit_the_wire_are_local_errors(message: Message) -> None:
    with pytest.raises(LocalProtocolError) as caught:
        message.encode()
    assert caught.value.errno == errno.EINVAL


def test_flags_decode_as_named_bits_and_keep_unknown_ones() -> None:
    payload = struct.pack("=IIII", 16, 0x103, 10, 5)
    reply = decode_message(Header(1, 4, HEADER_SIZE + 16, 1), payload)
    assert isinstance(reply, DeviceInfoReply)
    assert reply.flags & DeviceFlag.RESET and reply.flags == 0x103
    assert reply.encode_payload() == payload


def test_feature_index_is_the_low_sixteen_bits() -> None:
    request = DeviceFeatureRequest(flags=FeatureFlag.SET | Feature.MIG_DEVICE_STATE)
    assert request.feature == Feature.MIG_DEVICE_STATE
