# Rules of this module:
#
# * VERSION carries optional UTF-8 JSON, NUL-terminated, of the form
#   {"capabilities": {...}}.  Every capability is optional; an absent one
#   means the spec's default (see the DEFAULT_* constants), so a decoded
#   ``None`` is kept as ``None`` rather than replaced by the default.
# * Known capabilities are type-checked on receipt: a number must be a
#   non-negative JSON integer (not a boolean), a flag a JSON boolean, an
#   object an object.  Anything else is a remote error (EINVAL).
# * Unknown capabilities are kept verbatim in ``extra`` and sent back out
#   unchanged, so a proxy does not silently drop what it does not understand.
# * ``migration`` ({"pgsize": N}) is not in the spec: it is what the older
#   libvfio-user that QEMU bundles sends and expects.
"""The JSON capabilities exchanged in VERSION."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from errno import EINVAL

from vdev.protocol.errors import RemoteProtocolError

#: Spec default of ``max_msg_fds`` when a peer does not state it.
DEFAULT_MAX_MSG_FDS = 1
#: Spec default of ``max_data_xfer_size`` when a peer does not state it.
DEFAULT_MAX_DATA_XFER_SIZE = 1024 * 1024
#: Spec default of ``max_dma_maps`` when a peer does not state it.
DEFAULT_MAX_DMA_MAPS = 65535
#: Spec default of ``pgsizes`` (4 KiB pages only) when a peer does not state it.
DEFAULT_PGSIZES = 4096

_KNOWN = frozenset(
    {
        "max_msg_fds",
        "max_data_xfer_size",
        "max_dma_maps",
        "pgsizes",
        "twin_socket",
        "write_multiple",
        "migration",
    }
)


@dataclass(frozen=True)
class TwinSocket:
    """``twin_socket``: server-to-client commands on a second socket.

    ``fd_index`` is only meaningful in a reply: which of the reply's file
    descriptors is the client end of the second socket.
    """

    supported: bool = False
    fd_index: int | None = None


@dataclass(frozen=True)
class MigrationCapability:
    """libvfio-user's ``migration`` object: the dirty-page granularity."""

    pgsize: int | None = None


@dataclass(frozen=True, kw_only=True)
class Capabilities:
    """The ``capabilities`` object of a VERSION message."""

    max_msg_fds: int | None = None
    max_data_xfer_size: int | None = None
    max_dma_maps: int | None = None
    pgsizes: int | None = None
    twin_socket: TwinSocket | None = None
    write_multiple: bool | None = None
    migration: MigrationCapability | None = None
    #: Capabilities this codec does not know, as decoded from JSON.
    extra: Mapping[str, object] = field(default_factory=dict)

    @property
    def effective_max_msg_fds(self) -> int:
        """How many fds the sender accepts per message (spec default applied)."""
        return DEFAULT_MAX_MSG_FDS if self.max_msg_fds is None else self.max_msg_fds

    @property
    def effective_max_data_xfer_size(self) -> int:
        """The largest read/write count the sender accepts (spec default applied)."""
        if self.max_data_xfer_size is None:
            return DEFAULT_MAX_DATA_XFER_SIZE
        return self.max_data_xfer_size

    def to_json(self) -> dict[str, object]:
        """The JSON object for the wire; absent capabilities are left out."""
        caps: dict[str, object] = {}
        for name in ("max_msg_fds", "max_data_xfer_size", "max_dma_maps", "pgsizes"):
            value = getattr(self, name)
            if value is not None:
                caps[name] = value
        if self.twin_socket is not None:
            twin: dict[str, object] = {"supported": self.twin_socket.supported}
            if self.twin_socket.fd_index is not None:
                twin["fd_index"] = self.twin_socket.fd_index
            caps["twin_socket"] = twin
        if self.write_multiple is not None:
            caps["write_multiple"] = self.write_multiple
        if self.migration is not None:
            migration: dict[str, object] = {}
            if self.migration.pgsize is not None:
                migration["pgsize"] = self.migration.pgsize
            caps["migration"] = migration
        caps.update(self.extra)
        return caps

    @classmethod
    def from_json(cls, caps: object) -> Capabilities:
        """Check and convert a decoded ``capabilities`` object."""
        obj = _object(caps, "capabilities")
        twin = obj.get("twin_socket")
        migration = obj.get("migration")
        return cls(
            max_msg_fds=_number(obj, "max_msg_fds"),
            max_data_xfer_size=_number(obj, "max_data_xfer_size"),
            max_dma_maps=_number(obj, "max_dma_maps"),
            pgsizes=_number(obj, "pgsizes"),
            twin_socket=None if twin is None else _twin_socket(twin),
            write_multiple=_flag(obj, "write_multiple"),
            migration=None
            if migration is None
            else MigrationCapability(pgsize=_number(_object(migration, "migration"), "pgsize")),
            extra={key: value for key, value in obj.items() if key not in _KNOWN},
        )


def encode_version_data(capabilities: Capabilities) -> bytes:
    """The NUL-terminated JSON that follows the VERSION major and minor."""
    text = json.dumps({"capabilities": capabilities.to_json()}, separators=(",", ":"))
    return text.encode() + b"\0"


def decode_version_data(data: bytes) -> Capabilities:
    """Parse VERSION's JSON; a missing ``capabilities`` key means none stated."""
    if not data.endswith(b"\0"):
        raise RemoteProtocolError("VERSION JSON is not NUL-terminated", EINVAL)
    try:
        top = json.loads(data[:-1].decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RemoteProtocolError(f"VERSION data is not JSON: {exc}", EINVAL) from exc
    caps = _object(top, "version data").get("capabilities")
    return Capabilities() if caps is None else Capabilities.from_json(caps)


def _object(value: object, what: str) -> dict[str, object]:
    if not isinstance(value, dict):
        raise RemoteProtocolError(f"{what} must be a JSON object, got {value!r}", EINVAL)
    return value


def _number(obj: Mapping[str, object], name: str) -> int | None:
    value = obj.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise RemoteProtocolError(f"{name} must be a non-negative integer, got {value!r}", EINVAL)
    return value


def _flag(obj: Mapping[str, object], name: str) -> bool | None:
    value = obj.get(name)
    if value is None or isinstance(value, bool):
        return value
    raise RemoteProtocolError(f"{name} must be a boolean, got {value!r}", EINVAL)


def _twin_socket(value: object) -> TwinSocket:
    obj = _object(value, "twin_socket")
    return TwinSocket(supported=bool(_flag(obj, "supported")), fd_index=_number(obj, "fd_index"))
