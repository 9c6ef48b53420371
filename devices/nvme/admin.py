"""The admin command set, and the features Get/Set Features reach, as tables.

Each admin command is one entry of :data:`ADMIN_COMMANDS`: its name and an
``async`` handler ``(controller, command, queue) -> DW0``.  A handler fails
a command by raising :class:`~vdev_devices.nvme.queues.CommandError`; it
returns :data:`DEFERRED` when the completion comes later (an Asynchronous
Event Request waits for an event).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Container
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from vdev_devices.nvme import structures
from vdev_devices.nvme.queues import CommandError, SubmissionEntry, SubmissionQueue
from vdev_devices.nvme.spec import (
    IDENTIFY_SIZE,
    AdminOpcode,
    AsyncEventType,
    Cns,
    FeatureId,
    LogPage,
    Status,
)

if TYPE_CHECKING:
    from vdev_devices.nvme.controller import Nvme


class _Deferred:
    def __repr__(self) -> str:
        return "DEFERRED"


#: What a handler returns when it completes the command later itself.
DEFERRED: Final = _Deferred()

AdminHandler = Callable[["Nvme", SubmissionEntry, SubmissionQueue], Awaitable["int | _Deferred"]]


@dataclass(frozen=True)
class AdminCommand:
    name: str
    handler: AdminHandler


# -- queues ---------------------------------------------------------------------------------


def _check_new_queue(
    ctrl: Nvme, cmd: SubmissionEntry, qid: int, entries: int, contiguous: int, existing: Container[int]
) -> None:
    """What Create I/O CQ and Create I/O SQ both check about the queue to create."""
    if qid == 0 or qid > ctrl.queues_allocated or qid in existing:
        raise CommandError(Status.INVALID_QUEUE_IDENTIFIER)
    if entries < 2 or entries > ctrl.max_queue_entries:
        raise CommandError(Status.INVALID_QUEUE_SIZE)
    if not contiguous:
        raise CommandError(Status.INVALID_FIELD)
    if cmd.prp1 & (ctrl.page_size - 1):
        raise CommandError(Status.PRP_OFFSET_INVALID)


async def create_cq(ctrl: Nvme, cmd: SubmissionEntry, _sq: SubmissionQueue) -> int:
    qid, entries = cmd.cdw10 & 0xFFFF, (cmd.cdw10 >> 16) + 1
    contiguous, interrupts, vector = cmd.cdw11 & 1, bool(cmd.cdw11 & 2), cmd.cdw11 >> 16
    _check_new_queue(ctrl, cmd, qid, entries, contiguous, ctrl.cqs)
    if interrupts and vector >= ctrl.interrupt_vectors:
        raise CommandError(Status.INVALID_INTERRUPT_VECTOR)
    ctrl.create_cq(qid, cmd.prp1, entries, vector, interrupts)
    return 0


async def create_sq(ctrl: Nvme, cmd: SubmissionEntry, _sq: SubmissionQueue) -> int:
    qid, entries = cmd.cdw10 & 0xFFFF, (cmd.cdw10 >> 16) + 1
    contiguous, priority, cqid = cmd.cdw11 & 1, (cmd.cdw11 >> 1) & 0x3, cmd.cdw11 >> 16
    if cqid == 0 or cqid not in ctrl.cqs:
        raise CommandError(Status.COMPLETION_QUEUE_INVALID)
    _check_new_queue(ctrl, cmd, qid, entries, contiguous, ctrl.sqs)
    ctrl.create_sq(qid, cmd.prp1, entries, cqid, priority)
    return 0


async def delete_sq(ctrl: Nvme, cmd: SubmissionEntry, _sq: SubmissionQueue) -> int:
    qid = cmd.cdw10 & 0xFFFF
    if qid == 0 or qid not in ctrl.sqs:
        raise CommandError(Status.INVALID_QUEUE_IDENTIFIER)
    await ctrl.delete_sq(qid)
    return 0


async def delete_cq(ctrl: Nvme, cmd: SubmissionEntry, _sq: SubmissionQueue) -> int:
    qid = cmd.cdw10 & 0xFFFF
    if qid == 0 or qid not in ctrl.cqs:
        raise CommandError(Status.INVALID_QUEUE_IDENTIFIER)
    if ctrl.cqs[qid].sqs:
        raise CommandError(Status.INVALID_QUEUE_DELETION)
    ctrl.delete_cq(qid)
    return 0


# -- identify and logs -------------------------------------------------------------------------


async def identify(ctrl: Nvme, cmd: SubmissionEntry, _sq: SubmissionQueue) -> int:
    cns, csi = cmd.cdw10 & 0xFF, cmd.cdw11 >> 24
    if cns == Cns.CONTROLLER:
        data = structures.identify_controller(ctrl.identity)
    elif cns == Cns.NAMESPACE:
        data = structures.identify_namespace(ctrl.namespace(cmd.nsid))
    elif cns == Cns.ACTIVE_NAMESPACES:
        if cmd.nsid >= 0xFFFF_FFFE:
            raise CommandError(Status.INVALID_NAMESPACE)
        data = structures.namespace_list(ctrl.active_namespaces, after=cmd.nsid)
    elif cns == Cns.NAMESPACE_DESCRIPTORS:
        data = structures.namespace_descriptors(ctrl.namespace(cmd.nsid))
    elif cns == Cns.CSI_CONTROLLER and csi == 0:
        data = bytes(IDENTIFY_SIZE)  # the NVM command set sets no limits beyond MDTS
    else:
        raise CommandError(Status.INVALID_FIELD)
    await ctrl.to_host(cmd, data)
    return 0


#: Which asynchronous event type a log page acknowledges when read without Retain Asynchronous Event.
LOG_EVENT_TYPES = {
    LogPage.ERROR: AsyncEventType.ERROR,
    LogPage.SMART: AsyncEventType.SMART,
    LogPage.CHANGED_NAMESPACES: AsyncEventType.NOTICE,
}


async def get_log_page(ctrl: Nvme, cmd: SubmissionEntry, _sq: SubmissionQueue) -> int:
    lid, retain = cmd.cdw10 & 0xFF, bool(cmd.cdw10 & (1 << 15))
    dwords = ((cmd.cdw10 >> 16) | (cmd.cdw11 & 0xFFFF) << 16) + 1
    offset = cmd.cdw12 | cmd.cdw13 << 32
    if lid == LogPage.ERROR:
        data = structures.error_log(ctrl.error_entries)
    elif lid == LogPage.SMART:
        if cmd.nsid not in (0, 0xFFFF_FFFF):
            raise CommandError(Status.INVALID_FIELD)  # LPA does not offer per-namespace SMART data
        data = structures.smart_log(ctrl.health, ctrl.over_temperature)
    elif lid == LogPage.FIRMWARE_SLOT:
        data = structures.firmware_slot_log()
    elif lid == LogPage.CHANGED_NAMESPACES:
        data = structures.changed_namespace_log(ctrl.changed_namespaces)
        if not retain:
            ctrl.changed_namespaces.clear()
    else:
        raise CommandError(Status.INVALID_LOG_PAGE)
    if offset & 0x3 or offset >= len(data):
        raise CommandError(Status.INVALID_FIELD)
    length = 4 * dwords
    await ctrl.to_host(cmd, data[offset : offset + length].ljust(length, b"\0"))
    if not retain and lid in LOG_EVENT_TYPES:
        ctrl.acknowledge_events(LOG_EVENT_TYPES[LogPage(lid)])
    return 0


# -- abort and asynchronous events ------------------------------------------------------------


async def abort(ctrl: Nvme, cmd: SubmissionEntry, _sq: SubmissionQueue) -> int:
    """DW0 bit 0 is 0 when the command was aborted, 1 when it was not (it had completed, or never came)."""
    sqid, cid = cmd.cdw10 & 0xFFFF, cmd.cdw10 >> 16
    return 0 if await ctrl.abort(sqid, cid) else 1


async def async_event_request(ctrl: Nvme, cmd: SubmissionEntry, sq: SubmissionQueue) -> int | _Deferred:
    if not ctrl.hold_async_event(sq, cmd):
        raise CommandError(Status.ASYNC_EVENT_LIMIT_EXCEEDED)
    return DEFERRED


# -- features -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class FeatureRule:
    """A feature: its value's writable bits and default, and which part of CDW11 selects an instance.

    ``instance`` extracts the instance a command addresses from CDW11 (a
    temperature sensor and threshold, an interrupt vector) for features that
    have several; ``check`` refuses values the controller cannot take.
    """

    name: str
    mask: int
    default: Callable[[Nvme, int], int] = lambda _ctrl, _instance: 0
    instance: Callable[[int], int] = lambda _cdw11: 0
    check: Callable[[Nvme, int, int], None] = lambda _ctrl, _instance, _value: None


def _temperature_instance(cdw11: int) -> int:
    """TMPSEL (bits 19:16) and THSEL (bits 21:20), kept in their places."""
    return cdw11 & 0x3F_0000


def _temperature_default(_ctrl: Nvme, instance: int) -> int:
    over = (instance >> 20) & 0x3 == 0
    return structures.WARNING_TEMPERATURE if over else 0


def _temperature_check(_ctrl: Nvme, instance: int, _value: int) -> None:
    sensor, kind = (instance >> 16) & 0xF, (instance >> 20) & 0x3
    if sensor != 0 or kind > 1:  # the composite temperature only; over and under thresholds
        raise CommandError(Status.INVALID_FIELD)


def _power_check(_ctrl: Nvme, _instance: int, value: int) -> None:
    if value & 0x1F:  # power state 0 is the only one (NPSS = 0)
        raise CommandError(Status.INVALID_FIELD)


def _write_cache_check(ctrl: Nvme, _instance: int, _value: int) -> None:
    if not ctrl.identity.write_cache:
        raise CommandError(Status.INVALID_FIELD)


def _vector_check(ctrl: Nvme, instance: int, _value: int) -> None:
    if instance >= ctrl.interrupt_vectors:
        raise CommandError(Status.INVALID_FIELD)


def _queues_default(ctrl: Nvme, _instance: int) -> int:
    count = ctrl.max_io_queues - 1
    return count << 16 | count


FEATURES: dict[int, FeatureRule] = {
    FeatureId.ARBITRATION: FeatureRule("Arbitration", 0xFFFF_FF07),
    FeatureId.POWER_MANAGEMENT: FeatureRule("Power Management", 0xFF, check=_power_check),
    FeatureId.TEMPERATURE_THRESHOLD: FeatureRule(
        "Temperature Threshold",
        0xFFFF,
        default=_temperature_default,
        instance=_temperature_instance,
        check=_temperature_check,
    ),
    FeatureId.ERROR_RECOVERY: FeatureRule("Error Recovery", 0xFFFF),
    FeatureId.VOLATILE_WRITE_CACHE: FeatureRule(
        "Volatile Write Cache", 0x1, default=lambda ctrl, _i: int(ctrl.identity.write_cache), check=_write_cache_check
    ),
    FeatureId.NUMBER_OF_QUEUES: FeatureRule("Number of Queues", 0xFFFF_FFFF, default=_queues_default),
    FeatureId.INTERRUPT_COALESCING: FeatureRule("Interrupt Coalescing", 0xFFFF),
    FeatureId.INTERRUPT_VECTOR_CONFIGURATION: FeatureRule(
        "Interrupt Vector Configuration", 0x1_0000, instance=lambda cdw11: cdw11 & 0xFFFF, check=_vector_check
    ),
    FeatureId.WRITE_ATOMICITY: FeatureRule("Write Atomicity Normal", 0x1),
    FeatureId.ASYNC_EVENT_CONFIGURATION: FeatureRule("Asynchronous Event Configuration", 0x1FF),
}

SELECT_CURRENT, SELECT_DEFAULT, SELECT_SAVED, SELECT_CAPABILITIES = 0, 1, 2, 3
#: Get Features with SEL = supported capabilities: bit 2, changeable (none is saveable or per namespace).
CAPABILITY_CHANGEABLE = 1 << 2


def _feature(fid: int) -> FeatureRule:
    feature = FEATURES.get(fid)
    if feature is None:
        raise CommandError(Status.INVALID_FIELD)
    return feature


async def get_features(ctrl: Nvme, cmd: SubmissionEntry, _sq: SubmissionQueue) -> int:
    fid, select = cmd.cdw10 & 0xFF, (cmd.cdw10 >> 8) & 0x7
    feature = _feature(fid)
    instance = feature.instance(cmd.cdw11)
    feature.check(ctrl, instance, 0)
    if select == SELECT_CAPABILITIES:
        return CAPABILITY_CHANGEABLE
    if select in (SELECT_DEFAULT, SELECT_SAVED):
        value = feature.default(ctrl, instance)
    elif select == SELECT_CURRENT:
        value = ctrl.feature(fid, instance)
    else:
        raise CommandError(Status.INVALID_FIELD)
    if fid == FeatureId.INTERRUPT_VECTOR_CONFIGURATION:
        value |= instance
    return value


async def set_features(ctrl: Nvme, cmd: SubmissionEntry, _sq: SubmissionQueue) -> int:
    fid, save = cmd.cdw10 & 0xFF, bool(cmd.cdw10 >> 31)
    feature = _feature(fid)
    if save:
        raise CommandError(Status.FEATURE_NOT_SAVEABLE)
    instance = feature.instance(cmd.cdw11)
    value = cmd.cdw11 & feature.mask
    feature.check(ctrl, instance, value)
    if fid == FeatureId.NUMBER_OF_QUEUES:
        return ctrl.set_queue_count(value & 0xFFFF, value >> 16)
    ctrl.set_feature(fid, instance, value)
    return 0


ADMIN_COMMANDS: dict[int, AdminCommand] = {
    AdminOpcode.DELETE_SQ: AdminCommand("Delete I/O Submission Queue", delete_sq),
    AdminOpcode.CREATE_SQ: AdminCommand("Create I/O Submission Queue", create_sq),
    AdminOpcode.GET_LOG_PAGE: AdminCommand("Get Log Page", get_log_page),
    AdminOpcode.DELETE_CQ: AdminCommand("Delete I/O Completion Queue", delete_cq),
    AdminOpcode.CREATE_CQ: AdminCommand("Create I/O Completion Queue", create_cq),
    AdminOpcode.IDENTIFY: AdminCommand("Identify", identify),
    AdminOpcode.ABORT: AdminCommand("Abort", abort),
    AdminOpcode.SET_FEATURES: AdminCommand("Set Features", set_features),
    AdminOpcode.GET_FEATURES: AdminCommand("Get Features", get_features),
    AdminOpcode.ASYNC_EVENT_REQUEST: AdminCommand("Asynchronous Event Request", async_event_request),
}
