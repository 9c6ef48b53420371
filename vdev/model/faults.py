"""Device faults: a plan of misbehaviour applied inside a device without touching its code.

Not the proxy's wire faults (:class:`vdev.proxy.WireFaultPlan`, ``vdev proxy
--wire-faults``), which tamper with vfio-user messages between any client and
any server.  Device faults happen where the device meets its client, with
the device's knowledge (an errno from a handler, an interrupt not sent); wire
faults happen to the bytes, so the device never knows.  The two plan files
look alike (a ``seed`` and a list of ``faults``) but their rules do not: a
device-fault rule says ``on`` (what happened in the device), a wire-fault rule
says ``fault`` (what to do to a message), and each loader refuses the other's
plan with a line saying which flag it belongs to.

A :class:`DeviceFaultPlan` is a list of :class:`DeviceFault` rules.  At each point where
a device meets its client — a trapped access, an interrupt, a DMA, a reset,
a quiesce — the device asks the plan whether a fault applies and, if so,
carries it out and records a ``fault`` event.  Rules match on what happened
(``on``), where (region, offset range, vector), how often (skip the first
``after`` matches, inject at most ``count`` times) and by chance
(``probability``, drawn from the plan's seeded generator so a run repeats).
``err`` and ``req`` on a read or write signal the ERR interrupt (the device
reports an unrecoverable error) or REQ (it asks the client to release it),
and the access goes on as usual.

Plans are Python objects or files (JSON, or TOML by extension) for
``vdev serve --device-faults PLAN``::

    {"seed": 7, "faults": [
      {"on": "read", "region": 0, "offset": 8, "action": "delay", "seconds": 2, "count": 1},
      {"on": "write", "region": 2, "action": "errno", "errno": "EIO", "probability": 0.1},
      {"on": "read", "region": 0, "action": "corrupt", "xor": 255},
      {"on": "write", "region": 0, "offset": 16, "action": "req"},
      {"on": "read", "region": 0, "offset": 8, "action": "err", "after": 100},
      {"on": "irq", "action": "storm", "times": 50},
      {"on": "dma", "action": "fail"},
      {"on": "quiesce", "action": "busy", "seconds": 1},
      {"on": "reset", "action": "fail"}
    ]}

A device may add events of its own — code points only it has, such as an
NVMe controller's commands — with :func:`define_fault_event`.  Their rules
match on the attributes the device reports (``where``, e.g. ``{"opcode": 2}``;
a list matches any of its values) and carry the device's own parameters
(``params``), which the device checks when the plan is made::

    {"on": "command", "action": "status", "where": {"qid": 1, "opcode": 2},
     "params": {"status": "UNRECOVERED_READ_ERROR"}, "count": 1}
"""

from __future__ import annotations

import errno as errnos
import json
import random
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Which actions each kind of event accepts.
ACTIONS: dict[str, frozenset[str]] = {
    "read": frozenset({"delay", "errno", "corrupt", "err", "req"}),
    "write": frozenset({"delay", "errno", "drop", "err", "req"}),
    "irq": frozenset({"drop", "duplicate", "storm"}),
    "dma": frozenset({"fail", "delay"}),
    "reset": frozenset({"fail"}),
    "quiesce": frozenset({"busy"}),
}
#: Actions that make the device wait, so its accesses must run in Trio.
WAITING_ACTIONS = frozenset({"delay", "busy"})


@dataclass(frozen=True)
class DeviceFaultEvent:
    """A fault event a device defines: the actions it takes and how it checks a rule's ``where`` and ``params``."""

    actions: frozenset[str]
    check: Callable[[DeviceFault], None] | None = None


_device_events: dict[str, DeviceFaultEvent] = {}


def define_fault_event(on: str, actions: Iterable[str], check: Callable[[DeviceFault], None] | None = None) -> None:
    """Let plans target a device's own code point ``on`` with ``actions``.

    Devices call this when their module is imported, before any plan naming
    the event is read.  ``check`` raises :class:`DeviceFaultPlanError` for a rule
    the device could not carry out (an unknown parameter, say), so a bad
    plan fails when it is loaded rather than when the fault fires.  The
    framework's own events cannot be redefined.
    """
    if on in ACTIONS:
        raise ValueError(f"fault event {on!r} is the framework's own")
    known = _device_events.get(on)
    if known is not None and (known.actions != frozenset(actions) or known.check is not check):
        raise ValueError(f"fault event {on!r} is already defined differently")
    _device_events[on] = DeviceFaultEvent(frozenset(actions), check)


class DeviceFaultPlanError(ValueError):
    """A plan that cannot be applied: unknown kinds or actions, missing parameters."""


class InjectedError(Exception):
    """The answer a fault chose for an access or a reset: an errno for the client."""

    def __init__(self, errno: int, what: str) -> None:
        super().__init__(f"injected {errnos.errorcode.get(errno, errno)} on {what}")
        self.errno = errno


@dataclass
class DeviceFault:
    """One rule of a plan."""

    on: str
    action: str
    region: int | None = None
    offset: int | tuple[int, int] | None = None
    vector: int | None = None
    after: int = 0
    count: int | None = None
    probability: float = 1.0
    seconds: float = 0.0
    errno: int = errnos.EIO
    xor: int = 0xFFFF_FFFF_FFFF_FFFF
    times: int = 2
    where: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    matched: int = field(default=0, init=False)
    injected: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        device_event = _device_events.get(self.on)
        actions = ACTIONS.get(self.on, device_event.actions if device_event else None)
        if actions is None:
            known = ", ".join(sorted({*ACTIONS, *_device_events}))
            raise DeviceFaultPlanError(f"unknown fault event {self.on!r} (one of {known})")
        if self.action not in actions:
            allowed = ", ".join(sorted(actions))
            raise DeviceFaultPlanError(f"action {self.action!r} does not apply to {self.on!r} (one of {allowed})")
        if not 0.0 <= self.probability <= 1.0:
            raise DeviceFaultPlanError("probability must be between 0 and 1")
        if self.action in WAITING_ACTIONS and self.seconds < 0:
            raise DeviceFaultPlanError("seconds must not be negative")
        if device_event is None and (self.where or self.params):
            raise DeviceFaultPlanError(f"{self.on!r} faults take no 'where' or 'params'")
        if device_event is not None and device_event.check is not None:
            device_event.check(self)

    def covers(self, region: int | None, offset: int | None, vector: int | None, attributes: Mapping[str, Any]) -> bool:
        if self.region is not None and region != self.region:
            return False
        if self.vector is not None and vector != self.vector:
            return False
        for name, wanted in self.where.items():
            value = attributes.get(name)
            if value not in wanted if isinstance(wanted, list) else value != wanted:
                return False
        if self.offset is None or offset is None:
            return self.offset is None
        if isinstance(self.offset, tuple):
            low, high = self.offset
            return low <= offset < high
        return offset == self.offset

    def describe(self) -> dict[str, Any]:
        """The rule's fields that say what was injected, for the event log."""
        details: dict[str, Any] = {"on": self.on, "action": self.action}
        if self.action in WAITING_ACTIONS:
            details["seconds"] = self.seconds
        if self.action == "errno":
            details["errno"] = errnos.errorcode.get(self.errno, self.errno)
        if self.action == "corrupt":
            details["xor"] = self.xor
        if self.action == "storm":
            details["times"] = self.times
        if self.where:
            details["where"] = dict(self.where)
        if self.params:
            details["params"] = dict(self.params)
        return details


class DeviceFaultPlan:
    """The faults one device suffers, with the seeded chance that decides probabilistic ones.

    A plan is fixed once made (assign a new one to change it), so that what
    it means for every access is worked out here, once: an event no rule
    is about costs one dictionary lookup.
    """

    def __init__(self, faults: Sequence[DeviceFault] = (), *, seed: int = 0) -> None:
        self.faults = tuple(faults)
        self.seed = seed
        self._random = random.Random(seed)
        self._by_event: dict[str, tuple[DeviceFault, ...]] = {}
        for fault in self.faults:
            self._by_event[fault.on] = (*self._by_event.get(fault.on, ()), fault)
        #: The kinds of event (``on``) some rule is about.
        self.kinds = frozenset(self._by_event)
        #: Whether some fault makes a handler wait (the device's accesses then run in Trio).  Only the
        #: framework's events wait inside handlers; a device's own events are carried out by the device.
        self.needs_thread = any(fault.on in ACTIONS and fault.action in WAITING_ACTIONS for fault in self.faults)

    def has(self, on: str) -> bool:
        """Whether any rule is about events of kind ``on``."""
        return on in self.kinds

    def pick(
        self,
        on: str,
        *,
        region: int | None = None,
        offset: int | None = None,
        vector: int | None = None,
        **attributes: Any,
    ) -> DeviceFault | None:
        """The fault to inject now for this event, if any (counting matches as it goes).

        ``attributes`` are what a device reports about its own events, for
        the rules' ``where``.
        """
        for fault in self._by_event.get(on, ()):
            if not fault.covers(region, offset, vector, attributes):
                continue
            fault.matched += 1
            if fault.matched <= fault.after:
                continue
            if fault.count is not None and fault.injected >= fault.count:
                continue
            if fault.probability < 1.0 and self._random.random() >= fault.probability:
                continue
            fault.injected += 1
            return fault
        return None

    @classmethod
    def from_mapping(cls, document: Mapping[str, Any]) -> DeviceFaultPlan:
        """A plan from its JSON/TOML form (see the module docstring)."""
        faults = []
        for number, entry in enumerate(document.get("faults", [])):
            entry = dict(entry)
            if "fault" in entry and "on" not in entry:
                wire = "that plan is for vdev proxy --wire-faults"
                raise DeviceFaultPlanError(f"fault {number} is a wire-fault rule ('fault', not 'on'): {wire}")
            if isinstance(entry.get("errno"), str):
                name = entry["errno"]
                if not hasattr(errnos, name):
                    raise DeviceFaultPlanError(f"fault {number}: unknown errno {name!r}")
                entry["errno"] = getattr(errnos, name)
            if isinstance(entry.get("offset"), list):
                entry["offset"] = tuple(entry["offset"])
            try:
                faults.append(DeviceFault(**entry))
            except TypeError as exc:
                raise DeviceFaultPlanError(f"fault {number}: {exc}") from None
            except DeviceFaultPlanError as exc:
                raise DeviceFaultPlanError(f"fault {number}: {exc}") from None
        return cls(faults, seed=int(document.get("seed", 0)))

    @classmethod
    def load(cls, path: str | Path) -> DeviceFaultPlan:
        """Read a plan file: TOML if it ends in ``.toml``, JSON otherwise."""
        path = Path(path)
        try:
            text = path.read_text()
            document = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
        except (OSError, ValueError) as exc:
            raise DeviceFaultPlanError(f"cannot read fault plan {path}: {exc}") from None
        return cls.from_mapping(document)
