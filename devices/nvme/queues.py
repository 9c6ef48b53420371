"""Submission and completion queues, commands, and the PRPs that point at their data.

Queues live in the host's memory; the controller keeps only their
geometry and its own head/tail pointers.  A submission queue is served by
one Trio task of the controller (started when the queue is created,
cancelled when it is deleted or the controller resets); every task that
works for a queue lives in a cancel scope the queue owns, so deleting the
queue stops all of it.  Doorbell writes arrive in the device's serving
thread: they move a pointer and return the wake-up for the caller to pass
to the Trio thread, since Trio objects are only touched there.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import trio

from vdev_devices.nvme.spec import COMMAND, CQ_ENTRY_SIZE, SQ_ENTRY_SIZE, Status


class CommandError(Exception):
    """A command fails with ``status``; ``dnr``: the host should not retry it."""

    def __init__(self, status: Status | int, *, dnr: bool = True, lba: int = 0) -> None:
        super().__init__(f"status {int(status):#05x}")
        self.status = int(status)
        self.dnr = dnr
        #: The first LBA the failure concerns (for the Error Information log).
        self.lba = lba


@dataclass(frozen=True)
class SubmissionEntry:
    """A submission queue entry, decoded (common command format)."""

    opcode: int
    flags: int
    cid: int
    nsid: int
    mptr: int
    prp1: int
    prp2: int
    cdw10: int
    cdw11: int
    cdw12: int
    cdw13: int
    cdw14: int
    cdw15: int

    @classmethod
    def parse(cls, raw: bytes | memoryview) -> SubmissionEntry:
        (opcode, flags, cid, nsid, _reserved, mptr, prp1, prp2, *cdws) = COMMAND.unpack(raw)
        return cls(opcode, flags, cid, nsid, mptr, prp1, prp2, *cdws)

    def pack(self) -> bytes:
        """The 64-byte entry (for clients and tests that submit commands)."""
        return COMMAND.pack(
            self.opcode, self.flags, self.cid, self.nsid, 0, self.mptr, self.prp1, self.prp2,
            self.cdw10, self.cdw11, self.cdw12, self.cdw13, self.cdw14, self.cdw15,
        )  # fmt: skip

    @property
    def fused(self) -> int:
        return self.flags & 0x3

    @property
    def psdt(self) -> int:
        """PRP or SGL for Data Transfer: 0 means PRPs."""
        return (self.flags >> 6) & 0x3

    @property
    def slba(self) -> int:
        return self.cdw10 | self.cdw11 << 32

    @property
    def nlb(self) -> int:
        """Number of logical blocks (the field is 0-based)."""
        return (self.cdw12 & 0xFFFF) + 1


def command(opcode: int, cid: int, *, nsid: int = 0, prp1: int = 0, prp2: int = 0, **cdws: int) -> SubmissionEntry:
    """A command to submit: ``command(0x06, 1, prp1=buf, cdw10=1)`` is Identify Controller."""
    dwords = {f"cdw{n}": cdws.pop(f"cdw{n}", 0) for n in range(10, 16)}
    if cdws:
        raise TypeError(f"unknown command fields {', '.join(cdws)}")
    return SubmissionEntry(opcode, 0, cid, nsid, 0, prp1, prp2, **dwords)


@dataclass(eq=False)
class CompletionQueue:
    """A completion queue: ``size`` entries at ``base``, signalled on ``vector`` if ``interrupts``."""

    qid: int
    base: int
    size: int
    vector: int
    interrupts: bool
    head: int = 0
    tail: int = 0
    phase: int = 1
    #: Submission queues posting here (a CQ cannot be deleted while it has any).
    sqs: set[int] = field(default_factory=set)
    #: Completions posted since the last interrupt.
    unsignalled: int = 0
    space: trio.Event = field(default_factory=trio.Event)

    @property
    def full(self) -> bool:
        return (self.tail + 1) % self.size == self.head

    @property
    def pending(self) -> bool:
        """Whether entries wait for the host (it has not moved its head past them)."""
        return self.head != self.tail

    def slot(self) -> int:
        """The address of the next entry to write."""
        return self.base + self.tail * CQ_ENTRY_SIZE

    def advance(self) -> None:
        self.tail += 1
        if self.tail == self.size:
            self.tail = 0
            self.phase ^= 1

    async def wait_for_space(self) -> None:
        while self.full:
            self.space = trio.Event()
            await self.space.wait()

    def host_consumed(self, head: int) -> Callable[[], None]:
        """The host moved its head; returns what wakes a writer waiting for room (to run on the Trio thread)."""
        self.head = head
        return self.space.set


@dataclass(frozen=True)
class Held:
    """A command the controller has taken but not completed: an AER, or one a fault holds."""

    cid: int
    opcode: int
    complete: Callable[[int, bool, int], Awaitable[None]]
    #: Whether an Abort command may complete it.
    abortable: bool = True


@dataclass(eq=False)
class SubmissionQueue:
    """A submission queue: ``size`` entries at ``base``, completing into ``cqid``."""

    qid: int
    base: int
    size: int
    cqid: int
    priority: int = 0
    head: int = 0
    tail: int = 0
    #: Set when the host rings the doorbell (or the controller may proceed again).
    wakeup: trio.Event = field(default_factory=trio.Event)
    #: Deleted (or dropped by a reset): its tasks stop at their next step, and post nothing more.
    deleted: bool = False
    #: Commands taken and not completed, by command id.
    held: dict[int, Held] = field(default_factory=dict)
    scopes: set[trio.CancelScope] = field(default_factory=set)

    @property
    def empty(self) -> bool:
        return self.head == self.tail

    def available(self) -> int:
        """Entries the host submitted that lie contiguously from the head (no wrap)."""
        if self.tail >= self.head:
            return self.tail - self.head
        return self.size - self.head

    def entry_address(self) -> int:
        return self.base + self.head * SQ_ENTRY_SIZE

    def ring(self, tail: int) -> Callable[[], None]:
        """The host moved its tail; returns what wakes the queue's task (to run on the Trio thread)."""
        self.tail = tail
        return self.wakeup.set

    def cancel(self) -> None:
        """Stop every task working for this queue (on the Trio thread)."""
        for scope in list(self.scopes):
            scope.cancel()


async def run_owned(owner: SubmissionQueue, function: Callable[..., Awaitable[Any]], *args: Any) -> None:
    """Run ``function`` in a cancel scope ``owner`` holds, so deleting the queue cancels it."""
    scope = trio.CancelScope()
    owner.scopes.add(scope)
    try:
        with scope:
            await function(*args)
    finally:
        owner.scopes.discard(scope)


# -- PRPs -------------------------------------------------------------------------------------


async def prp_segments(
    read: Callable[[int, int], Awaitable[bytes]], prp1: int, prp2: int, length: int, page_size: int
) -> list[tuple[int, int]]:
    """The host memory a PRP pair describes for ``length`` bytes, as ``(address, size)`` runs.

    PRP1 may start anywhere in a page; every further page is whole and page
    aligned.  Up to two pages, PRP2 is the second page; beyond that it
    points at a PRP list, whose last entry in each list page points at the
    next list page when more entries are needed.  Adjacent pages are merged
    into one run.  ``read`` fetches list pages from host memory.
    """
    if length <= 0:
        return []
    mask = page_size - 1
    if prp1 & 0x3:
        raise CommandError(Status.PRP_OFFSET_INVALID)
    first = min(length, page_size - (prp1 & mask))
    pages = [(prp1, first)]
    remaining = length - first
    if remaining and remaining <= page_size:
        if prp2 & mask:
            raise CommandError(Status.PRP_OFFSET_INVALID)
        pages.append((prp2, remaining))
        remaining = 0
    list_address = prp2
    if remaining and list_address & 0x7:
        raise CommandError(Status.PRP_OFFSET_INVALID)
    while remaining:
        slots = (page_size - (list_address & mask)) // 8
        needed = -(-remaining // page_size)
        last_page = needed <= slots
        raw = await read(list_address, 8 * (needed if last_page else slots))
        take = needed if last_page else slots - 1
        entries = [int.from_bytes(raw[i : i + 8], "little") for i in range(0, len(raw), 8)]
        for entry in entries[:take]:
            if entry & mask:
                raise CommandError(Status.PRP_OFFSET_INVALID)
            size = min(page_size, remaining)
            pages.append((entry, size))
            remaining -= size
        if remaining:
            list_address = entries[-1]
            if list_address & 0x7:
                raise CommandError(Status.PRP_OFFSET_INVALID)
    return merge_runs(pages)


def merge_runs(pieces: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Join pieces that continue one another in memory."""
    runs: list[tuple[int, int]] = []
    for address, size in pieces:
        if runs and runs[-1][0] + runs[-1][1] == address:
            runs[-1] = (runs[-1][0], runs[-1][1] + size)
        else:
            runs.append((address, size))
    return runs
