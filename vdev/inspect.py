"""``vdev inspect SOCKET``: what a vfio-user server offers, as an engineer wants to see it first.

Connects as a client (nothing is written to the device), reads config space
and every region's and IRQ type's info, and renders an lspci-like text or a
JSON document.  Works against any vfio-user server, not only vdev's.
"""

from __future__ import annotations

import os
import socket
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vdev.client import Client

REGION_NAMES = {0: "BAR0", 1: "BAR1", 2: "BAR2", 3: "BAR3", 4: "BAR4", 5: "BAR5", 6: "ROM", 7: "config", 8: "VGA"}
IRQ_NAMES = {0: "INTx", 1: "MSI", 2: "MSI-X", 3: "ERR", 4: "REQ"}
CAPABILITY_NAMES = {
    0x01: "Power Management",
    0x05: "MSI",
    0x09: "Vendor Specific",
    0x10: "PCI Express",
    0x11: "MSI-X",
}
EXTENDED_NAMES = {0x0001: "Advanced Error Reporting", 0x0003: "Device Serial Number", 0x000B: "Vendor Specific"}
CONFIG_REGION = 7


@dataclass
class FoundCapability:
    """A capability as the chain in a server's config space shows it (not a declared :class:`vdev.Capability`)."""

    offset: int
    id: int
    name: str
    extended: bool
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class Region:
    index: int
    name: str
    size: int
    readable: bool
    writable: bool
    mappable: bool
    sparse_areas: list[tuple[int, int]]
    fds: int


@dataclass
class Report:
    vendor_id: int
    device_id: int
    subsystem_vendor_id: int
    subsystem_id: int
    revision: int
    class_code: int
    header_type: int
    command: int
    status: int
    interrupt_pin: int
    bars: list[dict[str, Any]]
    capabilities: list[FoundCapability]
    regions: list[Region]
    irqs: dict[str, int]
    resettable: bool
    config_size: int


def _u(config: bytes, offset: int, size: int) -> int:
    return int.from_bytes(config[offset : offset + size], "little")


def _decode_capability(config: bytes, at: int, cap_id: int) -> dict[str, Any]:
    if cap_id == 0x05:
        control = _u(config, at + 2, 2)
        return {
            "vectors": 1 << ((control >> 1) & 7),
            "64bit": bool(control & 0x80),
            "maskable": bool(control & 0x100),
            "enabled": bool(control & 1),
        }
    if cap_id == 0x11:
        control, table, pba = struct.unpack_from("<HII", config, at + 2)
        return {
            "vectors": (control & 0x7FF) + 1,
            "enabled": bool(control & 0x8000),
            "table": f"BAR{table & 7}+{table & ~7:#x}",
            "pba": f"BAR{pba & 7}+{pba & ~7:#x}",
        }
    if cap_id == 0x10:
        caps, devcap = _u(config, at + 2, 2), _u(config, at + 4, 4)
        return {"version": caps & 0xF, "type": (caps >> 4) & 0xF, "flr": bool(devcap & (1 << 28))}
    if cap_id == 0x01:
        return {"pmcsr_state": f"D{_u(config, at + 4, 2) & 3}"}
    if cap_id == 0x09:
        return {"length": config[at + 2]}
    return {}


def _capabilities(config: bytes) -> list[FoundCapability]:
    found: list[FoundCapability] = []
    if _u(config, 0x06, 2) & 0x10:
        pointer, seen = config[0x34] & ~3, set()
        while pointer and pointer not in seen and pointer + 2 <= min(len(config), 256):
            seen.add(pointer)
            cap_id = config[pointer]
            name = CAPABILITY_NAMES.get(cap_id, f"unknown {cap_id:#04x}")
            found.append(FoundCapability(pointer, cap_id, name, False, _decode_capability(config, pointer, cap_id)))
            pointer = config[pointer + 1] & ~3
    pointer, seen = 0x100, set()
    while len(config) > 0x100 and pointer and pointer not in seen and pointer + 4 <= len(config):
        seen.add(pointer)
        header = _u(config, pointer, 4)
        if header in (0, 0xFFFFFFFF):
            break
        cap_id = header & 0xFFFF
        details: dict[str, Any] = {"version": (header >> 16) & 0xF}
        if cap_id == 0x0003:
            details["serial"] = f"{_u(config, pointer + 4, 8):016x}"
        name = EXTENDED_NAMES.get(cap_id, f"unknown {cap_id:#06x}")
        found.append(FoundCapability(pointer, cap_id, name, True, details))
        pointer = header >> 20
    return found


def _bars(config: bytes, sizes: dict[int, int]) -> list[dict[str, Any]]:
    """The six BAR registers decoded; a BAR is unimplemented when its region is empty and it reads 0."""
    bars: list[dict[str, Any]] = []
    slot = 0
    while slot < 6:
        raw = _u(config, 0x10 + 4 * slot, 4)
        entry: dict[str, Any] = {"index": slot, "raw": raw}
        if not raw and not sizes.get(slot):
            entry["kind"] = "unimplemented"
        elif raw & 1:
            entry["kind"] = "io"
        elif raw & 0x6 == 0x4:
            entry["kind"] = "mem64"
            entry["prefetchable"] = bool(raw & 8)
            bars.append(entry)
            slot += 2
            continue
        else:
            entry["kind"] = "mem32"
            entry["prefetchable"] = bool(raw & 8)
        bars.append(entry)
        slot += 1
    return bars


async def gather(path: str | os.PathLike[str]) -> Report:
    """Ask the server at ``path`` everything the report shows."""
    async with Client.connect(path) as client:
        device = await client.device_info()
        regions = []
        for index in range(device.num_regions):
            info = await client.region_info(index)
            regions.append(
                Region(
                    index,
                    REGION_NAMES.get(index, f"region {index}"),
                    info.size,
                    info.readable,
                    info.writable,
                    info.mappable,
                    [(area.offset, area.size) for area in info.sparse_areas or ()],
                    len(info.fds),
                )
            )
        config_size = next((r.size for r in regions if r.index == CONFIG_REGION), 256)
        config = await client.region_read(CONFIG_REGION, 0, config_size)
        irqs = {}
        for index in range(device.num_irqs):
            irqs[IRQ_NAMES.get(index, str(index))] = (await client.irq_info(index)).count
    return Report(
        vendor_id=_u(config, 0x00, 2),
        device_id=_u(config, 0x02, 2),
        subsystem_vendor_id=_u(config, 0x2C, 2),
        subsystem_id=_u(config, 0x2E, 2),
        revision=config[0x08],
        class_code=_u(config, 0x09, 3),
        header_type=config[0x0E],
        command=_u(config, 0x04, 2),
        status=_u(config, 0x06, 2),
        interrupt_pin=config[0x3D],
        bars=_bars(config, {region.index: region.size for region in regions}),
        capabilities=_capabilities(config),
        regions=regions,
        irqs=irqs,
        resettable=device.resettable,
        config_size=config_size,
    )


def as_json(report: Report) -> dict[str, Any]:
    return asdict(report)


def _size(size: int) -> str:
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if size >= 1 << shift and size % (1 << shift) == 0:
            return f"{size >> shift}{unit}"
    return str(size)


def as_text(report: Report) -> str:
    pin = "none" if not report.interrupt_pin else "INT" + "ABCD"[report.interrupt_pin - 1]
    lines = [
        f"{report.vendor_id:04x}:{report.device_id:04x} (rev {report.revision:02x}) class {report.class_code:06x}"
        f", subsystem {report.subsystem_vendor_id:04x}:{report.subsystem_id:04x}",
        f"  header type {report.header_type:#04x}, config space {report.config_size} bytes,"
        f" {'resettable' if report.resettable else 'no reset'}",
        f"  command {report.command:#06x}, status {report.status:#06x}, interrupt pin {pin}",
        "  regions:",
    ]
    for region in report.regions:
        if not region.size:
            continue
        flags = ((region.readable, "r"), (region.writable, "w"), (region.mappable, "m"))
        access = "".join(letter if present else "-" for present, letter in flags)
        sparse = ", ".join(f"[{offset:#x}+{_size(size)}]" for offset, size in region.sparse_areas)
        extra = f" mmap {sparse}" if sparse else (" mmap whole" if region.mappable else "")
        fds = f" ({region.fds} fd{'s' if region.fds != 1 else ''})" if region.fds else ""
        lines.append(f"    {region.name:6} {_size(region.size):>6} {access}{extra}{fds}")
    lines.append("  BAR registers:")
    for bar in report.bars:
        if bar["kind"] != "unimplemented":
            kind = bar["kind"] + (", prefetchable" if bar.get("prefetchable") else "")
            lines.append(f"    BAR{bar['index']}   {bar['raw']:#010x} ({kind})")
    lines.append("  capabilities:")
    for cap in report.capabilities:
        details = ", ".join(f"{key}={value}" for key, value in cap.details.items())
        lines.append(f"    [{cap.offset:#05x}] {cap.name}" + (f": {details}" if details else ""))
    lines.append("  interrupts: " + ", ".join(f"{name} {count}" for name, count in report.irqs.items()))
    return "\n".join(lines)


# -- who holds a server -------------------------------------------------------------
#
# A vfio-user server serves one client at a time; the next one waits, connected
# but unanswered, in the listening socket's backlog.  When `vdev inspect` gets no
# answer it says who is attached, from the kernel's own view of UNIX sockets
# (sock_diag, as `ss -xp` uses it) and /proc.

_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST, _NLM_F_DUMP = 0x1, 0x300
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_UDIAG_SHOW_VFS, _UDIAG_SHOW_PEER, _UDIAG_SHOW_ICONS = 0x2, 0x4, 0x8
_UNIX_DIAG_VFS, _UNIX_DIAG_PEER, _UNIX_DIAG_ICONS = 1, 2, 3
_TCP_ESTABLISHED, _TCP_LISTEN = 1, 10
_NLMSG = struct.Struct("=IHHII")
_UNIX_DIAG_REQ = struct.Struct("=BBHIII2I")
_UNIX_DIAG_MSG = struct.Struct("=BBBBI2I")
_RTATTR = struct.Struct("=HH")


@dataclass(frozen=True)
class Peer:
    """A process at the client end of a connection to a server's socket."""

    pid: int | None
    command: str

    def __str__(self) -> str:
        return f"pid {self.pid} ({self.command})" if self.pid is not None else "a process this user cannot see"


def _unix_sockets() -> list[tuple[int, int, dict[int, bytes]]]:
    """(inode, state, attributes) of every UNIX socket of this network namespace."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG) as netlink:
        show = _UDIAG_SHOW_VFS | _UDIAG_SHOW_PEER | _UDIAG_SHOW_ICONS
        request = _UNIX_DIAG_REQ.pack(socket.AF_UNIX, 0, 0, 0xFFFF_FFFF, 0, show, 0xFFFF_FFFF, 0xFFFF_FFFF)
        netlink.send(
            _NLMSG.pack(_NLMSG.size + len(request), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST | _NLM_F_DUMP, 1, 0) + request
        )
        found: list[tuple[int, int, dict[int, bytes]]] = []
        while True:
            data = netlink.recv(1 << 16)
            offset = 0
            while offset + _NLMSG.size <= len(data):
                length, kind, _flags, _seq, _pid = _NLMSG.unpack_from(data, offset)
                if kind == _NLMSG_DONE:
                    return found
                if kind == _NLMSG_ERROR or length < _NLMSG.size:
                    raise OSError("sock_diag refused the query")
                _family, _type, state, _pad, inode, _c0, _c1 = _UNIX_DIAG_MSG.unpack_from(data, offset + _NLMSG.size)
                attributes = {}
                at, end = offset + _NLMSG.size + _UNIX_DIAG_MSG.size, offset + length
                while at + _RTATTR.size <= end:
                    size, kind = _RTATTR.unpack_from(data, at)
                    if size < _RTATTR.size:
                        break
                    attributes[kind] = data[at + _RTATTR.size : at + size]
                    at += (size + 3) & ~3
                found.append((inode, state, attributes))
                offset += (length + 3) & ~3


def _owner_of(inode: int) -> Peer:
    link = f"socket:[{inode}]"
    for process in Path("/proc").iterdir():
        if not process.name.isdigit():
            continue
        try:
            if any(os.readlink(fd) == link for fd in (process / "fd").iterdir()):
                arguments = (process / "cmdline").read_bytes().decode(errors="replace").split("\0")
                return Peer(int(process.name), " ".join(" ".join(arguments).split())[:120])
        except OSError:
            continue  # gone, or not ours to look at
    return Peer(None, "")


def holders(path: str | os.PathLike[str]) -> tuple[list[Peer], int]:
    """The clients attached to the server listening at ``path``, and how many wait in its backlog.

    The server's end of an accepted connection is bound to the listening
    socket's file (matched by inode, whatever path either side used); its
    peer is the client's socket, found in /proc.  Returns ``([], 0)`` where
    the kernel offers no socket diagnostics.
    """
    try:
        file_inode = os.stat(path).st_ino
        sockets = _unix_sockets()
    except OSError:
        return [], 0
    attached, waiting = [], 0
    for _inode, state, attributes in sockets:
        vfs = attributes.get(_UNIX_DIAG_VFS, b"")
        if len(vfs) < 4 or struct.unpack_from("=I", vfs)[0] != file_inode:
            continue
        if state == _TCP_LISTEN:
            waiting += len(attributes.get(_UNIX_DIAG_ICONS, b"")) // 4
        elif state == _TCP_ESTABLISHED and _UNIX_DIAG_PEER in attributes:
            (peer,) = struct.unpack("=I", attributes[_UNIX_DIAG_PEER][:4])
            attached.append(_owner_of(peer))
    return attached, waiting
