"""Wire-fault plans and the injector without sockets: parsing, matching, schedules and byte rewrites."""

from __future__ import annotations

import doctest
import json
import struct

import pytest

import vdev.proxy._framing
import vdev.proxy._plan
from vdev.protocol import (
    HEADER_SIZE,
    Command,
    DeviceResetRequest,
    Header,
    Message,
    RegionInfoReply,
    RegionInfoRequest,
    RegionReadReply,
    RegionReadRequest,
    RegionWriteRequest,
)
from vdev.proxy import (
    Close,
    Delay,
    Direction,
    Drop,
    Duplicate,
    ExtraFds,
    FaultInjector,
    FaultRule,
    Frame,
    Hangup,
    MessageKind,
    Oversize,
    RequestTracker,
    Send,
    Truncate,
    WireFaultPlan,
    WireFaultPlanError,
    WrongId,
)


def frame_of(message: Message, fds: tuple[int, ...] = ()) -> Frame:
    data = message.encode()
    return Frame(data, fds, Header.decode(data), message)


READ = RegionReadRequest(msg_id=5, region=0, offset=0, count=4)
REPLY = RegionReadReply(msg_id=5, region=0, offset=0, data=b"OLEH")


def test_doctests_run() -> None:
    for module in (vdev.proxy._plan, vdev.proxy._framing):
        assert doctest.testmod(module).failed == 0


# --- the file format ---------------------------------------------------------------------


TOML_PLAN = """
seed = 42

[[faults]]
fault = "delay"
seconds = 6.5
direction = "to_client"
message = "reply"
command = "region_read"
region = "BAR0"
offset = 0x0c

[[faults]]
fault = "extra_fds"
fds = 2
kind = "memfd"
command = "VFIO_USER_DEVICE_GET_REGION_INFO"
nth = 3
count = "all"
probability = 0.5
"""


def test_a_toml_plan_and_its_json_twin_load_the_same() -> None:
    plan = WireFaultPlan.from_toml(TOML_PLAN)
    assert plan.seed == 42
    delay, fds = plan.rules
    assert delay == FaultRule(
        Delay(6.5),
        direction=Direction.TO_CLIENT,
        message=MessageKind.REPLY,
        command=Command.REGION_READ,
        region=0,
        offset=0x0C,
    )
    assert fds.fault == ExtraFds(2, "memfd")
    assert (fds.command, fds.nth, fds.count, fds.probability) == (Command.DEVICE_GET_REGION_INFO, 3, None, 0.5)
    again = WireFaultPlan.from_json(json.dumps(plan.to_dict()))
    assert again == plan


@pytest.mark.parametrize(
    "fault",
    [
        Delay(1.0),
        Drop(),
        Duplicate(),
        WrongId(),
        WrongId(7),
        Truncate(),
        Truncate(20, resize=False),
        Oversize(),
        Oversize(100),
        ExtraFds(),
        Close(),
        Close(0),
    ],
)
def test_every_fault_round_trips_through_the_file_format(fault: object) -> None:
    plan = WireFaultPlan([FaultRule(fault, command=Command.REGION_WRITE, region=7, nth=2, count=3)], seed=9)  # type: ignore[arg-type]
    assert WireFaultPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"faults": [{"fault": "explode"}]}', "'fault' must be one of"),
        ('{"faults": [{"fault": "delay"}]}', "delay needs 'seconds'"),
        ('{"faults": [{"fault": "drop", "comand": "REGION_READ"}]}', "unknown key(s) comand"),
        ('{"faults": [{"fault": "drop", "command": "READ_REGION"}]}', "unknown command 'READ_REGION'"),
        ('{"faults": [{"fault": "drop", "direction": "sideways"}]}', "direction must be one of"),
        ('{"faults": [{"fault": "drop", "nth": 0}]}', "nth counts from 1"),
        ('{"faults": [{"fault": "drop", "probability": 1.5}]}', "probability must lie in [0, 1]"),
        ('{"faults": [{"fault": "drop", "offset": "ten"}]}', "offset must be an integer"),
        ('{"faults": [{"fault": "wrong_id", "msg_id": 70000}]}', "a message id is 16 bits"),
        ('{"faults": [{"fault": "extra_fds", "kind": "pipe"}]}', "kind must be 'eventfd' or 'memfd'"),
        ('{"seed": 1.5}', "seed must be an integer"),
        ('{"sed": 1}', "unknown key(s) sed"),
        ("[1, 2]", "a plan is an object"),
        ("{", "not JSON"),
    ],
)
def test_a_bad_plan_is_refused_with_the_rule_and_key(text: str, message: str) -> None:
    with pytest.raises(WireFaultPlanError) as caught:
        WireFaultPlan.from_json(text, source="plan.json")
    assert message in str(caught.value)
    assert str(caught.value).startswith("plan.json")


def test_plan_files_are_read_by_suffix(tmp_path: object) -> None:
    from pathlib import Path

    directory = Path(str(tmp_path))
    (directory / "plan.toml").write_text(TOML_PLAN)
    (directory / "plan.json").write_text(json.dumps(WireFaultPlan.from_toml(TOML_PLAN).to_dict()))
    assert WireFaultPlan.load(directory / "plan.toml") == WireFaultPlan.load(directory / "plan.json")
    with pytest.raises(WireFaultPlanError, match="cannot read fault plan"):
        WireFaultPlan.load(directory / "missing.toml")


# --- matching and schedules ----------------------------------------------------------------


def test_no_plan_forwards_every_frame_unchanged() -> None:
    frame = frame_of(READ, fds=(11,))
    actions, injected = FaultInjector().apply(frame, direction=Direction.TO_SERVER)
    assert actions == [Send(frame.data, (11,))] and injected is None


def test_a_reply_is_matched_by_the_offset_its_request_covered() -> None:
    tracker = RequestTracker()
    rule = FaultRule(Drop(), direction=Direction.TO_CLIENT, command=Command.REGION_READ, region=0, offset=2)
    injector = FaultInjector(WireFaultPlan([rule]))
    request = frame_of(READ)
    assert tracker.observe(Direction.TO_SERVER, request) is None
    assert injector.apply(request, direction=Direction.TO_SERVER)[1] is None  # wrong direction
    error_reply = frame_of(RegionReadReply(msg_id=5, region=0, offset=0, data=b""))  # claims 0 bytes
    answered = tracker.observe(Direction.TO_CLIENT, error_reply)
    assert answered == READ
    actions, injected = injector.apply(error_reply, direction=Direction.TO_CLIENT, request=answered, connection=3)
    assert actions == []
    assert injected is not None
    assert (injected.fault, injected.region, injected.offset, injected.connection) == ("drop", 0, 0, 3)
    line = json.loads(injected.to_json())
    assert line["command"] == "REGION_READ" and line["message"] == "reply" and line["msg_id"] == 5


def test_offsets_outside_the_access_and_other_regions_do_not_match() -> None:
    rule = FaultRule(Drop(), region=0, offset=4)
    injector = FaultInjector(WireFaultPlan([rule]))
    for message in (
        RegionReadRequest(msg_id=1, region=0, offset=0, count=4),  # covers 0-3
        RegionReadRequest(msg_id=2, region=7, offset=4, count=4),  # config space
        RegionInfoRequest(msg_id=3, index=0),  # no offset at all
        DeviceResetRequest(msg_id=4),
    ):
        assert injector.apply(frame_of(message), direction=Direction.TO_SERVER)[1] is None
    hit = RegionWriteRequest(msg_id=5, region=0, offset=2, data=b"abcd")  # covers 2-5
    assert injector.apply(frame_of(hit), direction=Direction.TO_SERVER)[1] is not None


def test_region_only_rules_match_region_info() -> None:
    rule = FaultRule(Drop(), message=MessageKind.REPLY, region=7)
    injector = FaultInjector(WireFaultPlan([rule]))
    reply = RegionInfoReply(msg_id=1, index=7, flags=3, size=256)
    assert injector.apply(frame_of(reply), direction=Direction.TO_CLIENT)[1] is not None


def test_nth_and_count_choose_which_matches_fire() -> None:
    rule = FaultRule(Drop(), command=Command.REGION_READ, nth=2, count=2)
    injector = FaultInjector(WireFaultPlan([rule]))
    fired = [injector.apply(frame_of(READ), direction=Direction.TO_SERVER)[1] is not None for _ in range(5)]
    assert fired == [False, True, True, False, False]


def test_the_first_firing_rule_wins_and_every_matching_rule_counts() -> None:
    first = FaultRule(Drop(), command=Command.REGION_READ, nth=2)
    second = FaultRule(Duplicate(), command=Command.REGION_READ, nth=2)
    injector = FaultInjector(WireFaultPlan([first, second]))
    kinds = []
    for _ in range(3):
        _actions, injected = injector.apply(frame_of(READ), direction=Direction.TO_SERVER)
        kinds.append(injected.fault if injected else None)
    # Message 2 is the nth of both; the first rule takes it.  Message 3 is past
    # the second rule's nth too, so it fires then.
    assert kinds == [None, "drop", "duplicate"]


def test_probability_is_reproducible_from_the_seed() -> None:
    def pattern(seed: int) -> list[bool]:
        rule = FaultRule(Drop(), count=None, probability=0.5)
        injector = FaultInjector(WireFaultPlan([rule], seed=seed))
        return [injector.apply(frame_of(READ), direction=Direction.TO_SERVER)[1] is not None for _ in range(64)]

    assert pattern(1) == pattern(1)
    assert pattern(1) != pattern(2)
    assert 10 < sum(pattern(1)) < 54


# --- what each fault does to the bytes --------------------------------------------------------


def inflict(fault: object, message: Message = REPLY, fds: tuple[int, ...] = (9,)) -> list[object]:
    injector = FaultInjector(WireFaultPlan([FaultRule(fault)]))  # type: ignore[arg-type]
    actions, injected = injector.apply(frame_of(message, fds), direction=Direction.TO_CLIENT)
    assert injected is not None
    return list(actions)


def test_delay_drop_and_duplicate() -> None:
    data = REPLY.encode()
    assert inflict(Delay(2.5)) == [Send(data, (9,), delay=2.5)]
    assert inflict(Drop()) == []
    assert inflict(Duplicate()) == [Send(data, (9,)), Send(data, (9,))]


def test_wrong_id_changes_only_the_id() -> None:
    data = REPLY.encode()
    (send,) = inflict(WrongId())
    assert isinstance(send, Send)
    assert Header.decode(send.data).msg_id == 5 ^ 0x8000
    assert send.data[2:] == data[2:]
    (send,) = inflict(WrongId(77))
    assert isinstance(send, Send) and Header.decode(send.data).msg_id == 77


def test_truncate_with_and_without_a_resized_header() -> None:
    data = REPLY.encode()  # 16 + 16 + 4 bytes
    (short,) = inflict(Truncate())
    assert isinstance(short, Send)
    keep = HEADER_SIZE + (len(data) - HEADER_SIZE) // 2
    assert len(short.data) == keep and Header.decode(short.data).size == keep
    assert short.data[HEADER_SIZE:] == data[HEADER_SIZE:keep]
    (cut,) = inflict(Truncate(20, resize=False))
    assert isinstance(cut, Send)
    assert cut.data == data[:20] and Header.decode(cut.data).size == len(data)


def test_oversize_really_sends_the_extra_bytes() -> None:
    data = REPLY.encode()
    (big,) = inflict(Oversize(1000))
    assert isinstance(big, Send)
    assert len(big.data) == len(data) + 1000 == Header.decode(big.data).size
    assert big.data[HEADER_SIZE : len(data)] == data[HEADER_SIZE:] and big.data[len(data) :] == bytes(1000)


def test_extra_fds_ask_for_fresh_fds_after_the_real_ones() -> None:
    assert inflict(ExtraFds(2, "memfd")) == [Send(REPLY.encode(), (9,), attach=("memfd", "memfd"))]


def test_close_sends_part_of_the_message_then_hangs_up() -> None:
    data = REPLY.encode()
    assert inflict(Close()) == [Send(data[: len(data) // 2], (9,)), Hangup()]
    assert inflict(Close(after=0)) == [Hangup()]
    assert inflict(Close(after=1000)) == [Send(data, (9,)), Hangup()]


def test_rewrites_keep_reserved_flag_bits() -> None:
    data = bytearray(REPLY.encode())
    struct.pack_into("=I", data, 8, 1 | 0x4000_0000)  # a reply with a reserved bit set
    frame = Frame(bytes(data), (), Header.decode(bytes(data)), REPLY)
    injector = FaultInjector(WireFaultPlan([FaultRule(WrongId(1))]))
    (send,), _ = injector.apply(frame, direction=Direction.TO_CLIENT)
    assert isinstance(send, Send) and send.data[2:] == bytes(data[2:])
