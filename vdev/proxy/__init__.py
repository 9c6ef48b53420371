"""A vfio-user man-in-the-middle: inject faults, record sessions, replay them.

``Proxy`` sits between any vfio-user client (QEMU, ``vdev.client``) and any
server, relaying every message byte for byte with its fds, unless a
``WireFaultPlan`` says to delay, drop, duplicate, renumber, cut, pad, decorate
with fds or hang up on it.  With a transcript it writes each message as a
JSON line, and ``replay`` plays such a transcript's client side against a
server, reporting the first answer that differs.

    plan = WireFaultPlan([FaultRule(Delay(6.0), direction=Direction.TO_CLIENT,
                                command=Command.REGION_READ, region=0)])
    async with served(Hello(), server_path), proxied(proxy_path, server_path, plan=plan):
        ...  # QEMU attached to proxy_path times out on its first BAR0 read

The framing, the fault decisions and the transcript format are sans-IO
(``FrameReader``, ``FaultInjector``, ``Record``); only ``Proxy`` and
``replay`` touch sockets.
"""

from vdev.proxy._fds import FdInfo, create_fd, describe_fd
from vdev.proxy._framing import Frame, FrameReader, Unframed
from vdev.proxy._inject import (
    Action,
    FaultInjector,
    Hangup,
    InjectedFault,
    RequestTracker,
    Send,
    access_spans,
)
from vdev.proxy._plan import (
    FAULT_TYPES,
    Close,
    Delay,
    Direction,
    Drop,
    Duplicate,
    ExtraFds,
    FaultRule,
    MessageKind,
    Oversize,
    Truncate,
    WireFault,
    WireFaultPlan,
    WireFaultPlanError,
    WrongId,
)
from vdev.proxy._proxy import Proxy, proxied
from vdev.proxy._replay import (
    DEFAULT_TIMEOUT,
    Divergence,
    ReplayResult,
    compare_records,
    replay,
    run_replay,
)
from vdev.proxy._transcript import (
    Record,
    TranscriptError,
    TranscriptWriter,
    frame_record,
    load_transcript,
    read_transcript,
)

__all__ = [
    "Action",
    "Close",
    "DEFAULT_TIMEOUT",
    "Delay",
    "Direction",
    "Divergence",
    "Drop",
    "Duplicate",
    "ExtraFds",
    "FAULT_TYPES",
    "WireFault",
    "FaultInjector",
    "WireFaultPlan",
    "FaultRule",
    "FdInfo",
    "Frame",
    "FrameReader",
    "Hangup",
    "InjectedFault",
    "MessageKind",
    "Oversize",
    "WireFaultPlanError",
    "Proxy",
    "Record",
    "ReplayResult",
    "RequestTracker",
    "Send",
    "TranscriptError",
    "TranscriptWriter",
    "Truncate",
    "Unframed",
    "WrongId",
    "access_spans",
    "compare_records",
    "create_fd",
    "describe_fd",
    "frame_record",
    "load_transcript",
    "proxied",
    "read_transcript",
    "replay",
    "run_replay",
]
