"""The controller's own events, recorded in the device's log beside the framework's.

They share one trace kind, ``nvme``, and say which happened with ``what``,
so a trace reader can pick the controller's story out of the log with one
test; in Python, ``device.events.of_kind(NvmeEvent)`` or a subclass does it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from vdev import DeviceEvent


@dataclass(frozen=True, slots=True, kw_only=True)
class NvmeEvent(DeviceEvent):
    """Something the controller did or refused; ``what`` names it in traces."""

    kind: ClassVar[str] = "nvme"
    what: str


@dataclass(frozen=True, slots=True, kw_only=True)
class DoorbellInvalid(NvmeEvent):
    """The host wrote a doorbell of a queue that does not exist, or a value past the queue's end."""

    what: str = "invalid doorbell write"
    qid: int
    value: int
    #: The asynchronous event information code reported to the host.
    info: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ControllerEnabled(NvmeEvent):
    """CC.EN went to 1: the admin queues are at ``asq``/``acq``."""

    what: str = "enabled"
    page_size: int
    asq: int
    acq: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ControllerReset(NvmeEvent):
    """The controller reset (CC.EN cleared, a subsystem or function reset)."""

    what: str = "reset"
    why: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ControllerShutdown(NvmeEvent):
    """The host asked for a shutdown through CC.SHN."""

    what: str = "shutdown"
    abrupt: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class ControllerFatal(NvmeEvent):
    """Controller Fatal Status: the controller stops until the host resets it."""

    what: str = "fatal"
    why: str


@dataclass(frozen=True, slots=True, kw_only=True)
class CqCreated(NvmeEvent):
    """A completion queue was created."""

    what: str = "create cq"
    qid: int
    entries: int
    vector: int
    interrupts: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class SqCreated(NvmeEvent):
    """A submission queue was created."""

    what: str = "create sq"
    qid: int
    entries: int
    cqid: int


@dataclass(frozen=True, slots=True, kw_only=True)
class SqDeleted(NvmeEvent):
    """A submission queue was deleted."""

    what: str = "delete sq"
    qid: int


@dataclass(frozen=True, slots=True, kw_only=True)
class CqDeleted(NvmeEvent):
    """A completion queue was deleted."""

    what: str = "delete cq"
    qid: int


@dataclass(frozen=True, slots=True, kw_only=True)
class AdminCommandTaken(NvmeEvent):
    """The controller took an admin command (before any injected fault)."""

    what: str = "admin"
    opcode: int
    cid: int
    nsid: int
    cdw10: int
    cdw11: int


@dataclass(frozen=True, slots=True, kw_only=True)
class CommandFailed(NvmeEvent):
    """A command completed with a non-zero status."""

    what: str = "error"
    qid: int
    cid: int
    status: int
    dnr: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class InterruptNotDelivered(NvmeEvent):
    """A completion's interrupt could not be sent (the vector is not set up)."""

    what: str = "interrupt not delivered"
    vector: int
    why: str


@dataclass(frozen=True, slots=True, kw_only=True)
class AsyncEventRaised(NvmeEvent):
    """An asynchronous event for the host, delivered through an Asynchronous Event Request."""

    what: str = "async event"
    type: int
    info: int
    log: int


@dataclass(frozen=True, slots=True, kw_only=True)
class AbortRequested(NvmeEvent):
    """The host asked to abort command ``cid`` of queue ``qid``; ``aborted`` says whether it was."""

    what: str = "abort"
    qid: int
    cid: int
    aborted: bool
