"""The NVM command set, as a table: each I/O command's name and ``async`` handler.

A handler gets the controller, the command and the namespace it addresses
(the dispatcher has checked the NSID) and returns DW0 of the completion,
or raises :class:`~vdev_devices.nvme.queues.CommandError`.
"""

from __future__ import annotations

import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vdev_devices.nvme.namespace import Namespace
from vdev_devices.nvme.queues import CommandError, SubmissionEntry
from vdev_devices.nvme.spec import IoOpcode, Status

if TYPE_CHECKING:
    from vdev_devices.nvme.controller import Nvme

IoHandler = Callable[["Nvme", SubmissionEntry, Namespace], Awaitable[int]]
#: Flush accepts this NSID to mean every namespace.
ALL_NAMESPACES = 0xFFFF_FFFF
DSM_RANGE = struct.Struct("<IIQ")
DSM_DEALLOCATE = 1 << 2


@dataclass(frozen=True)
class IoCommand:
    name: str
    handler: IoHandler
    #: Whether NSID FFFFFFFFh is accepted, meaning: run the handler for every namespace.
    broadcast: bool = False


def _blocks(ctrl: Nvme, cmd: SubmissionEntry, ns: Namespace, *, transfer: bool) -> tuple[int, int]:
    """The command's (SLBA, NLB), checked against the namespace and, for data transfers, MDTS."""
    lba, count = cmd.slba, cmd.nlb
    if not ns.contains(lba, count):
        raise CommandError(Status.LBA_OUT_OF_RANGE, lba=lba)
    if transfer and count << ns.lba_shift > ctrl.max_transfer:
        raise CommandError(Status.INVALID_FIELD, lba=lba)
    return lba, count


async def read(ctrl: Nvme, cmd: SubmissionEntry, ns: Namespace) -> int:
    lba, count = _blocks(ctrl, cmd, ns, transfer=True)
    data = ns.read(lba, count)
    await ctrl.to_host(cmd, data)
    ctrl.health.read_commands += 1
    ctrl.health.bytes_read += len(data)
    return 0


async def write(ctrl: Nvme, cmd: SubmissionEntry, ns: Namespace) -> int:
    lba, count = _blocks(ctrl, cmd, ns, transfer=True)
    data = await ctrl.from_host(cmd, count << ns.lba_shift)
    ns.write(lba, data)
    ctrl.health.write_commands += 1
    ctrl.health.bytes_written += len(data)
    return 0


async def flush(ctrl: Nvme, cmd: SubmissionEntry, ns: Namespace) -> int:
    await ctrl.flush(ns)
    return 0


async def write_zeroes(ctrl: Nvme, cmd: SubmissionEntry, ns: Namespace) -> int:
    lba, count = _blocks(ctrl, cmd, ns, transfer=False)
    ns.zero(lba, count)
    return 0


async def dataset_management(ctrl: Nvme, cmd: SubmissionEntry, ns: Namespace) -> int:
    ranges = (cmd.cdw10 & 0xFF) + 1
    if not cmd.cdw11 & DSM_DEALLOCATE:
        return 0  # only hints: nothing to do
    raw = await ctrl.from_host(cmd, ranges * DSM_RANGE.size)
    blocks = [DSM_RANGE.unpack_from(raw, i * DSM_RANGE.size)[1:] for i in range(ranges)]
    for count, lba in blocks:
        if not ns.contains(lba, count):
            raise CommandError(Status.LBA_OUT_OF_RANGE, lba=lba)
    for count, lba in blocks:
        if count:
            ns.zero(lba, count)
    return 0


IO_COMMANDS: dict[int, IoCommand] = {
    IoOpcode.FLUSH: IoCommand("Flush", flush, broadcast=True),
    IoOpcode.WRITE: IoCommand("Write", write),
    IoOpcode.READ: IoCommand("Read", read),
    IoOpcode.WRITE_ZEROES: IoCommand("Write Zeroes", write_zeroes),
    IoOpcode.DATASET_MANAGEMENT: IoCommand("Dataset Management", dataset_management),
}
