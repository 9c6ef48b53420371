"""``vdev inspect SOCKET``: what a vfio-user server offers, as an engineer wants to see it first.

Connects as a client (nothing is written to the device), reads config space
and every region's and IRQ type's info, and renders an lspci-like text or a
JSON document.  Works against any vfio-user server, not only vdev's.
"""

from __future__ import annotations

import os
import struct
from dataclasses import asdict, dataclass, field
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
class Capability:
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
    capabilities: list[Capability]
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


def _capabilities(config: bytes) -> list[Capability]:
    found: list[Capability] = []
    if _u(config, 0x06, 2) & 0x10:
        pointer, seen = config[0x34] & ~3, set()
        while pointer and pointer not in seen and pointer + 2 <= min(len(config), 256):
            seen.add(pointer)
            cap_id = config[pointer]
            name = CAPABILITY_NAMES.get(cap_id, f"unknown {cap_id:#04x}")
            found.append(Capability(pointer, cap_id, name, False, _decode_capability(config, pointer, cap_id)))
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
        found.append(Capability(pointer, cap_id, name, True, details))
        pointer = header >> 20
    return found


def _bars(config: bytes) -> list[dict[str, Any]]:
    bars: list[dict[str, Any]] = []
    slot = 0
    while slot < 6:
        raw = _u(config, 0x10 + 4 * slot, 4)
        entry: dict[str, Any] = {"index": slot, "raw": raw}
        if raw & 1:
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
        bars=_bars(config),
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
    for bar in report.bars:
        if bar["raw"] or any(r.index == bar["index"] and r.size for r in report.regions):
            kind = bar["kind"] + (", prefetchable" if bar.get("prefetchable") else "")
            lines.append(f"    BAR{bar['index']} register: {bar['raw']:#010x} ({kind})")
    lines.append("  capabilities:")
    for cap in report.capabilities:
        details = ", ".join(f"{key}={value}" for key, value in cap.details.items())
        lines.append(f"    [{cap.offset:#05x}] {cap.name}" + (f": {details}" if details else ""))
    lines.append("  interrupts: " + ", ".join(f"{name} {count}" for name, count in report.irqs.items()))
    return "\n".join(lines)
