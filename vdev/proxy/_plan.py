# Rules of this module:
#
# * A plan is data: a seed and an ordered list of rules.  Each rule pairs one
#   fault (what to do to a message) with a selector (which messages) and a
#   schedule (the nth match, how many times, with what probability).
# * Selectors compare what travels on the wire: the direction, whether the
#   message is a request or a reply, its command, and for region accesses the
#   region index and an offset the access covers.  A reply is matched with
#   the region and offset of the request it answers.
# * Plans load from a mapping, JSON or TOML with the same keys; an unknown key
#   or a bad value is a ``WireFaultPlanError`` naming the rule and the key, because a
#   misspelt selector would silently match everything.
# * Nothing here touches a socket or a clock: the proxy shell applies plans.
"""Wire-fault plans: which faults to inject into which vfio-user messages."""

from __future__ import annotations

import enum
import json
import math
import os
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from vdev.protocol import Command, RegionIndex

#: Frame bytes appended by ``Oversize`` unless told otherwise: more than any
#: peer's default limit (1 MiB of data plus headers), so it is always refused.
DEFAULT_OVERSIZE_EXTRA = 2 << 20


class WireFaultPlanError(ValueError):
    """A fault plan that cannot be understood; the message names the rule and key."""


class Direction(enum.Enum):
    """Which way a message travels through the proxy."""

    #: From the client (QEMU) to the server (the device).
    TO_SERVER = "to_server"
    #: From the server to the client.
    TO_CLIENT = "to_client"


class MessageKind(enum.Enum):
    """Whether a message is a command or the reply to one."""

    REQUEST = "request"
    REPLY = "reply"


FdKind = Literal["eventfd", "memfd"]


# --- faults ------------------------------------------------------------------------


@dataclass(frozen=True)
class Delay:
    """Hold the message back for ``seconds`` while later messages flow past it.

    The delay is asynchronous: it does not stall the connection, so a client
    that gives up on the request (QEMU after ``x-msg-timeout``) goes on with
    the next one and meets the late reply afterwards.
    """

    seconds: float
    name: ClassVar[str] = "delay"


@dataclass(frozen=True)
class Drop:
    """Never deliver the message (its fds are closed)."""

    name: ClassVar[str] = "drop"


@dataclass(frozen=True)
class Duplicate:
    """Deliver the message twice, fds and all."""

    name: ClassVar[str] = "duplicate"


@dataclass(frozen=True)
class WrongId:
    """Deliver the message with another message id.

    ``msg_id`` ``None`` flips the top bit of the original id: an id no
    client that counts up from zero is waiting for.
    """

    msg_id: int | None = None
    name: ClassVar[str] = "wrong_id"


@dataclass(frozen=True)
class Truncate:
    """Deliver only the first ``keep`` bytes of the message.

    ``keep`` ``None`` keeps the header and half the payload.  With
    ``resize`` the header's size is rewritten to ``keep``: the stream stays
    framed and the peer meets a payload shorter than its layout.  Without
    it the header still promises the whole message, so the peer takes the
    next message's bytes as the rest of this one.
    """

    keep: int | None = None
    resize: bool = True
    name: ClassVar[str] = "truncate"


@dataclass(frozen=True)
class Oversize:
    """Pad the message with ``extra`` zero bytes and say so in its header.

    The frame really carries the bytes, so a peer that accepts it stays in
    sync; one that enforces a size limit refuses it.
    """

    extra: int = DEFAULT_OVERSIZE_EXTRA
    name: ClassVar[str] = "oversize"


@dataclass(frozen=True)
class ExtraFds:
    """Attach ``fds`` fresh file descriptors of ``kind`` the message does not expect."""

    fds: int = 1
    kind: FdKind = "eventfd"
    name: ClassVar[str] = "extra_fds"


@dataclass(frozen=True)
class Close:
    """Deliver the first ``after`` bytes of the message, then hang up on both peers.

    ``after`` ``None`` cuts the message in half; ``0`` closes right before
    it, at a message boundary.
    """

    after: int | None = None
    name: ClassVar[str] = "close"


WireFault = Delay | Drop | Duplicate | WrongId | Truncate | Oversize | ExtraFds | Close

#: Wire-fault classes by the name plans use for them.
FAULT_TYPES: dict[str, type[WireFault]] = {
    cls.name: cls for cls in (Delay, Drop, Duplicate, WrongId, Truncate, Oversize, ExtraFds, Close)
}


# --- rules and plans -----------------------------------------------------------------


@dataclass(frozen=True)
class FaultRule:
    """One fault and the messages it applies to.

    Selectors left at ``None`` match anything.  Among the messages the
    selectors match, the rule fires from the ``nth`` (1-based) on, at most
    ``count`` times (``None``: no limit), each time with ``probability``
    drawn from the plan's seeded generator.

        >>> rule = FaultRule(Delay(6.0), direction=Direction.TO_CLIENT,
        ...                  command=Command.REGION_READ, region=0, offset=0x0)
    """

    fault: WireFault
    _: KW_ONLY
    direction: Direction | None = None
    message: MessageKind | None = None
    command: int | None = None
    region: int | None = None
    #: Matches region accesses that cover this byte offset.
    offset: int | None = None
    nth: int = 1
    count: int | None = 1
    probability: float = 1.0

    def __post_init__(self) -> None:
        if self.nth < 1:
            raise WireFaultPlanError(f"nth counts from 1, not {self.nth}")
        if self.count is not None and self.count < 1:
            raise WireFaultPlanError(f"count must be at least 1 (or None for no limit), not {self.count}")
        if not 0.0 <= self.probability <= 1.0 or math.isnan(self.probability):
            raise WireFaultPlanError(f"probability must lie in [0, 1], not {self.probability}")
        _check_fault(self.fault)


def _check_fault(fault: WireFault) -> None:
    match fault:
        case Delay(seconds=seconds) if not (seconds >= 0 and math.isfinite(seconds)):
            raise WireFaultPlanError(f"delay needs a finite, non-negative number of seconds, not {seconds}")
        case WrongId(msg_id=msg_id) if msg_id is not None and not 0 <= msg_id <= 0xFFFF:
            raise WireFaultPlanError(f"a message id is 16 bits, not {msg_id}")
        case Truncate(keep=keep) if keep is not None and keep < 0:
            raise WireFaultPlanError(f"truncate cannot keep {keep} bytes")
        case Oversize(extra=extra) if extra < 1:
            raise WireFaultPlanError(f"oversize must add at least one byte, not {extra}")
        case ExtraFds(fds=fds, kind=kind) if fds < 1 or kind not in ("eventfd", "memfd"):
            raise WireFaultPlanError(f"extra_fds needs at least one fd of kind eventfd or memfd, not {fds} {kind!r}")
        case Close(after=after) if after is not None and after < 0:
            raise WireFaultPlanError(f"close cannot deliver {after} bytes")


@dataclass(frozen=True)
class WireFaultPlan:
    """The faults a proxy injects: rules in priority order and the seed of their dice.

    The first rule that fires on a message decides its fate; every rule
    whose selectors match still counts the message, so ``nth`` means the
    same thing whatever other rules do.

        >>> plan = WireFaultPlan.from_json('{"seed": 1, "faults": [{"fault": "drop", "command": "REGION_READ"}]}')
        >>> plan.rules[0].fault
        Drop()
    """

    rules: Sequence[FaultRule] = ()
    _: KW_ONLY
    seed: int = 0
    #: Where the plan came from, for messages.
    source: str = field(default="<plan>", compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "rules", tuple(self.rules))

    # -- loading ---------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "<plan>") -> WireFaultPlan:
        """A plan from ``{"seed": N, "faults": [{...}, ...]}``, as JSON and TOML give it."""
        if not isinstance(data, Mapping):
            raise WireFaultPlanError(f"{source}: a plan is an object with 'seed' and 'faults'")
        unknown = set(data) - {"seed", "faults"}
        if unknown:
            raise WireFaultPlanError(f"{source}: unknown key(s) {', '.join(sorted(unknown))} (expected seed, faults)")
        seed = data.get("seed", 0)
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise WireFaultPlanError(f"{source}: seed must be an integer, not {seed!r}")
        faults = data.get("faults", [])
        if not isinstance(faults, list):
            raise WireFaultPlanError(f"{source}: 'faults' must be a list of rules")
        rules = []
        for number, entry in enumerate(faults):
            try:
                rules.append(_rule_from_dict(entry))
            except WireFaultPlanError as exc:
                raise WireFaultPlanError(f"{source}: fault #{number}: {exc}") from None
        return cls(rules, seed=seed, source=source)

    @classmethod
    def from_json(cls, text: str, *, source: str = "<json>") -> WireFaultPlan:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise WireFaultPlanError(f"{source}: not JSON: {exc}") from None
        return cls.from_dict(data, source=source)

    @classmethod
    def from_toml(cls, text: str, *, source: str = "<toml>") -> WireFaultPlan:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise WireFaultPlanError(f"{source}: not TOML: {exc}") from None
        return cls.from_dict(data, source=source)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> WireFaultPlan:
        """Read a ``.toml`` or ``.json`` plan file (anything else is tried as JSON)."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise WireFaultPlanError(f"cannot read fault plan {path}: {exc.strerror}") from None
        if path.suffix.lower() == ".toml":
            return cls.from_toml(text, source=str(path))
        return cls.from_json(text, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        """The plan in the file format (``from_dict(to_dict())`` gives it back)."""
        return {"seed": self.seed, "faults": [_rule_to_dict(rule) for rule in self.rules]}


# --- the file format -------------------------------------------------------------------

_SELECTOR_KEYS = {"direction", "message", "command", "region", "offset", "nth", "count", "probability"}
_FAULT_KEYS: dict[str, set[str]] = {
    "delay": {"seconds"},
    "drop": set(),
    "duplicate": set(),
    "wrong_id": {"msg_id"},
    "truncate": {"keep", "resize"},
    "oversize": {"extra"},
    "extra_fds": {"fds", "kind"},
    "close": {"after"},
}


def _integer(value: object, key: str) -> int:
    """An integer, also from a string such as ``"0x10"`` (JSON has no hex literals)."""
    if isinstance(value, bool):
        raise WireFaultPlanError(f"{key} must be an integer, not {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value, 0)
        except ValueError:
            pass
    raise WireFaultPlanError(f"{key} must be an integer, not {value!r}")


def _number(value: object, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise WireFaultPlanError(f"{key} must be a number, not {value!r}")
    return float(value)


def _enum_value(enum_type: type[enum.Enum], value: object, key: str) -> Any:
    try:
        return enum_type(value)
    except ValueError:
        names = ", ".join(repr(member.value) for member in enum_type)
        raise WireFaultPlanError(f"{key} must be one of {names}, not {value!r}") from None


def parse_command(value: object) -> int:
    """A command from its spec name (any case, ``VFIO_USER_`` optional) or number."""
    if isinstance(value, str):
        name = value.strip().upper().removeprefix("VFIO_USER_")
        if name in Command.__members__:
            return Command[name]
        try:
            return int(name, 0)
        except ValueError:
            known = ", ".join(Command.__members__)
            raise WireFaultPlanError(f"unknown command {value!r} (commands: {known})") from None
    return _integer(value, "command")


def parse_region(value: object) -> int:
    """A region from its index or its PCI name (``BAR0`` ... ``CONFIG``)."""
    if isinstance(value, str) and value.strip().upper() in RegionIndex.__members__:
        return RegionIndex[value.strip().upper()]
    return _integer(value, "region")


def _rule_from_dict(entry: object) -> FaultRule:
    if not isinstance(entry, Mapping):
        raise WireFaultPlanError(f"a rule is an object with a 'fault' key, not {entry!r}")
    if "on" in entry and "fault" not in entry:
        raise WireFaultPlanError("a device-fault rule ('on', not 'fault'): that plan is for vdev serve --device-faults")
    kind = entry.get("fault")
    if kind not in _FAULT_KEYS:
        raise WireFaultPlanError(f"'fault' must be one of {', '.join(_FAULT_KEYS)}, not {kind!r}")
    unknown = set(entry) - {"fault"} - _SELECTOR_KEYS - _FAULT_KEYS[kind]
    if unknown:
        allowed = ", ".join(sorted(_SELECTOR_KEYS | _FAULT_KEYS[kind]))
        raise WireFaultPlanError(f"unknown key(s) {', '.join(sorted(unknown))} for {kind} (allowed: {allowed})")
    fault = _fault_from_dict(kind, entry)
    selectors: dict[str, Any] = {}
    if "direction" in entry:
        selectors["direction"] = _enum_value(Direction, entry["direction"], "direction")
    if "message" in entry:
        selectors["message"] = _enum_value(MessageKind, entry["message"], "message")
    if "command" in entry:
        selectors["command"] = parse_command(entry["command"])
    if "region" in entry:
        selectors["region"] = parse_region(entry["region"])
    if "offset" in entry:
        selectors["offset"] = _integer(entry["offset"], "offset")
    if "nth" in entry:
        selectors["nth"] = _integer(entry["nth"], "nth")
    if "count" in entry:
        count = entry["count"]
        selectors["count"] = None if count in (None, "all") else _integer(count, "count")
    if "probability" in entry:
        selectors["probability"] = _number(entry["probability"], "probability")
    return FaultRule(fault, **selectors)


def _fault_from_dict(kind: str, entry: Mapping[str, Any]) -> WireFault:
    match kind:
        case "delay":
            if "seconds" not in entry:
                raise WireFaultPlanError("delay needs 'seconds'")
            return Delay(_number(entry["seconds"], "seconds"))
        case "drop":
            return Drop()
        case "duplicate":
            return Duplicate()
        case "wrong_id":
            msg_id = entry.get("msg_id")
            return WrongId(None if msg_id is None else _integer(msg_id, "msg_id"))
        case "truncate":
            keep = entry.get("keep")
            resize = entry.get("resize", True)
            if not isinstance(resize, bool):
                raise WireFaultPlanError(f"resize must be true or false, not {resize!r}")
            return Truncate(None if keep is None else _integer(keep, "keep"), resize)
        case "oversize":
            return Oversize(_integer(entry.get("extra", DEFAULT_OVERSIZE_EXTRA), "extra"))
        case "extra_fds":
            fd_kind = entry.get("kind", "eventfd")
            if fd_kind not in ("eventfd", "memfd"):
                raise WireFaultPlanError(f"kind must be 'eventfd' or 'memfd', not {fd_kind!r}")
            return ExtraFds(_integer(entry.get("fds", 1), "fds"), fd_kind)
        case _:
            after = entry.get("after")
            return Close(None if after is None else _integer(after, "after"))


def _rule_to_dict(rule: FaultRule) -> dict[str, Any]:
    out: dict[str, Any] = {"fault": rule.fault.name}
    for key, value in vars(rule.fault).items():
        if value is not None:
            out[key] = value
    if rule.direction is not None:
        out["direction"] = rule.direction.value
    if rule.message is not None:
        out["message"] = rule.message.value
    if rule.command is not None:
        out["command"] = Command(rule.command).name if rule.command in Command._value2member_map_ else rule.command
    for key in ("region", "offset"):
        if getattr(rule, key) is not None:
            out[key] = getattr(rule, key)
    out["nth"] = rule.nth
    out["count"] = "all" if rule.count is None else rule.count
    out["probability"] = rule.probability
    return out
