"""Device events are typed: a class per kind, found by class, written to traces as flat JSON lines."""

from __future__ import annotations

import io
import json
from dataclasses import FrozenInstanceError, dataclass
from typing import ClassVar

import pytest
import trio

from vdev import DeviceEvent, DmaRefused, EventLog, RegionWrite, Violation


@dataclass(frozen=True, slots=True, kw_only=True)
class Doorbell(DeviceEvent):
    """A device's own kind, defined the way the events module documents."""

    kind: ClassVar[str] = "doorbell"
    queue: int
    tail: int


def test_a_trace_line_is_kind_device_time_and_the_fields() -> None:
    log = EventLog("nic0")
    trace = io.StringIO()
    log.write_to(trace)
    log.record(RegionWrite(region=0, offset=4, size=4, value=0x77))
    log.record(Doorbell(queue=1, tail=9))
    lines = [json.loads(line) for line in trace.getvalue().splitlines()]
    assert [list(line)[:3] for line in lines] == [["kind", "device", "t"]] * 2
    assert [{k: v for k, v in line.items() if k != "t"} for line in lines] == [
        {"kind": "region_write", "device": "nic0", "region": 0, "offset": 4, "size": 4, "value": 0x77},
        {"kind": "doorbell", "device": "nic0", "queue": 1, "tail": 9},
    ]


def test_variants_share_their_kind_and_are_found_by_their_base_class() -> None:
    log = EventLog("dev")
    refused = log.record(DmaRefused(direction="read", address=0x1000, size=8))
    own = log.record(Violation(what="doorbell past the ring", detail="tail 300 of 256"))
    log.record(Doorbell(queue=0, tail=1))
    assert refused.kind == own.kind == "violation"
    assert log.of_kind(Violation) == [refused, own]
    assert log.of_kind(DmaRefused) == [refused]
    assert log.of_kind(DmaRefused, Doorbell) == [refused, Doorbell(queue=0, tail=1)]


def test_events_are_values_that_compare_without_their_time() -> None:
    first, second = Doorbell(queue=1, tail=2), Doorbell(queue=1, tail=2)
    assert first == second and first.t <= second.t
    with pytest.raises(FrozenInstanceError):
        first.tail = 3  # type: ignore[misc]


@pytest.mark.trio
async def test_wait_for_wakes_on_the_class_it_was_given() -> None:
    log = EventLog("dev")
    found: list[Doorbell] = []

    async def waiter(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        found.append(await log.wait_for(Doorbell, count=2))

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(waiter)
            log.record(Doorbell(queue=0, tail=1))
            log.record(RegionWrite(region=0, offset=0, size=4, value=1))
            log.record(Doorbell(queue=0, tail=2))
    assert found == [Doorbell(queue=0, tail=2)]


def test_accesses_are_wanted_only_while_someone_listens_or_keeps_them() -> None:
    log = EventLog("dev")
    assert not log.accesses_wanted
    unsubscribe = log.subscribe(lambda event: None)
    assert log.accesses_wanted
    unsubscribe()
    assert not log.accesses_wanted
    log.keep_accesses = True
    assert log.accesses_wanted
