"""The controller's own fault event, ``nvme-command``: what may go wrong with a command it takes.

A rule matches commands by ``where`` — ``qid`` (0 is the admin queue),
``opcode`` and ``nsid``, each a value or a list of values — and the usual
``after``/``count``/``probability``.  Actions:

========== ===================================================================
action     what the controller does with the matching command
========== ===================================================================
hang       takes it and never completes it (until an Abort, a queue deletion
           or a controller reset); with ``params.abortable`` false an Abort
           does not reach it either (Abort reports "not aborted")
status     completes it with ``params.status`` (a :class:`Status` name or the
           11-bit SCT/SC number) without doing it; ``params.dnr`` (default
           true) sets Do Not Retry
delay      completes it ``seconds`` later; later commands go on meanwhile
fatal      sets CSTS.CFS (controller fatal status) and stops processing
           every queue; the command is never completed
memory-off clears the device's own COMMAND.MEM, then carries the command out;
           the host's later register accesses read all-ones and its writes
           are dropped until it enables memory again
========== ===================================================================

Example (JSON plan)::

    {"faults": [{"on": "nvme-command", "action": "status", "where": {"qid": [1, 2], "opcode": 2},
                 "params": {"status": "UNRECOVERED_READ_ERROR"}, "after": 100, "count": 1}]}
"""

from __future__ import annotations

from vdev.model.faults import DeviceFault, DeviceFaultPlanError, define_fault_event
from vdev_devices.nvme.spec import Status

EVENT = "nvme-command"
ACTIONS = frozenset({"hang", "status", "delay", "fatal", "memory-off"})
MATCHES = frozenset({"qid", "opcode", "nsid"})


def fault_status(fault: DeviceFault) -> tuple[int, bool]:
    """The status a ``status`` rule completes with, and whether Do Not Retry is set."""
    status = fault.params["status"]
    code = Status[status].value if isinstance(status, str) else int(status)
    return code, bool(fault.params.get("dnr", True))


def check(fault: DeviceFault) -> None:
    """Refuse a rule the controller could not carry out."""
    unknown = set(fault.where) - MATCHES
    if unknown:
        raise DeviceFaultPlanError(
            f"{EVENT} faults match on {', '.join(sorted(MATCHES))}, not {', '.join(sorted(unknown))}"
        )
    allowed = {"status": {"status", "dnr"}, "hang": {"abortable"}}.get(fault.action, set())
    extra = set(fault.params) - allowed
    if extra:
        raise DeviceFaultPlanError(f"{EVENT} {fault.action!r} takes no parameter {', '.join(sorted(extra))}")
    if fault.action == "status":
        status = fault.params.get("status")
        if isinstance(status, str) and status not in Status.__members__:
            raise DeviceFaultPlanError(f"unknown NVMe status {status!r}")
        if not isinstance(status, (str, int)) or isinstance(status, int) and not 0 < status < 0x800:
            raise DeviceFaultPlanError(f"{EVENT} 'status' needs params.status: a status name or an 11-bit code")
    for flag in ("dnr", "abortable"):
        if not isinstance(fault.params.get(flag, True), bool):
            raise DeviceFaultPlanError(f"{EVENT} params.{flag} is true or false")


define_fault_event(EVENT, ACTIONS, check)
