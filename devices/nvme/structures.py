"""The data the controller returns: Identify structures and log pages, built from its state."""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from vdev_devices.nvme.namespace import Namespace
from vdev_devices.nvme.spec import (
    ERROR_ENTRY,
    ERROR_ENTRY_SIZE,
    FIRMWARE_SLOT_LOG,
    IDENTIFY_CONTROLLER,
    IDENTIFY_NAMESPACE,
    IDENTIFY_SIZE,
    IOCQES,
    IOSQES,
    LOG_PAGE_SIZE,
    NIDT_CSI,
    NIDT_EUI64,
    NIDT_NGUID,
    NIDT_UUID,
    SMART_LOG,
    VERSION_1_4,
    pack,
)

#: ONCS: Dataset Management, Write Zeroes, Save/Select in Get/Set Features.
ONCS = (1 << 2) | (1 << 3) | (1 << 4)
#: OAES: namespace attribute notices.
OAES = 1 << 8
#: LPA: extended data for Get Log Page (NUMDU and offsets).
LPA = 1 << 2
#: FRMW: one firmware slot, slot 1 read-only.
FRMW = (1 << 1) | 1
ERROR_LOG_ENTRIES = 64
ABORT_LIMIT = 4
ASYNC_EVENT_LIMIT = 4
#: Composite temperature the controller reports (Kelvin) and its thresholds.
TEMPERATURE = 311
WARNING_TEMPERATURE = 343
CRITICAL_TEMPERATURE = 373
FIRMWARE_REVISION = "1.0"


@dataclass(frozen=True)
class ControllerIdentity:
    """What Identify Controller says that does not change while the controller runs."""

    vendor_id: int
    subsystem_vendor_id: int
    serial: str
    model: str
    mdts: int
    namespaces: int
    write_cache: bool

    @property
    def subnqn(self) -> str:
        return f"nqn.2024-01.io.vdev:nvme:{self.serial}"


def identify_controller(identity: ControllerIdentity) -> bytes:
    return pack(
        IDENTIFY_CONTROLLER,
        IDENTIFY_SIZE,
        {
            "vid": identity.vendor_id,
            "ssvid": identity.subsystem_vendor_id,
            "sn": identity.serial,
            "mn": identity.model,
            "fr": FIRMWARE_REVISION,
            "rab": 6,
            "mdts": identity.mdts,
            "ver": VERSION_1_4,
            "oaes": OAES,
            "cntrltype": 1,  # I/O controller
            "acl": ABORT_LIMIT - 1,
            "aerl": ASYNC_EVENT_LIMIT - 1,
            "frmw": FRMW,
            "lpa": LPA,
            "elpe": ERROR_LOG_ENTRIES - 1,
            "wctemp": WARNING_TEMPERATURE,
            "cctemp": CRITICAL_TEMPERATURE,
            "sqes": IOSQES << 4 | IOSQES,
            "cqes": IOCQES << 4 | IOCQES,
            "nn": identity.namespaces,
            "oncs": ONCS,
            # bit 0: a volatile write cache; bits 2:1 = 11b: Flush with NSID FFFFFFFFh applies to all namespaces
            "vwc": (0x7 if identity.write_cache else 0),
            "subnqn": identity.subnqn.encode("ascii").ljust(256, b"\0"),
            "psd0_mp": 2500,
        },
    )


def identify_namespace(namespace: Namespace) -> bytes:
    return pack(
        IDENTIFY_NAMESPACE,
        IDENTIFY_SIZE,
        {
            "nsze": namespace.blocks,
            "ncap": namespace.blocks,
            "nuse": namespace.allocated_blocks(),
            "nsfeat": 1,  # thin provisioning: NUSE is what is allocated
            "nlbaf": 0,
            "flbas": 0,
            # deallocated blocks read as zeroes; Write Zeroes may deallocate
            "dlfeat": 0x08 | 0x01,
            "nvmcap": namespace.size.to_bytes(16, "little"),
            "nguid": namespace.nguid,
            "eui64": namespace.eui64,
            "lbaf0_lbads": namespace.lba_shift,
        },
    )


def namespace_list(nsids: Iterable[int], after: int) -> bytes:
    """Up to 1024 namespace IDs greater than ``after``, ascending, zero-terminated."""
    chosen = sorted(n for n in nsids if n > after)[:1024]
    return struct.pack(f"<{len(chosen)}I", *chosen).ljust(IDENTIFY_SIZE, b"\0")


def namespace_descriptors(namespace: Namespace) -> bytes:
    """The Namespace Identification Descriptor list: EUI-64, NGUID, UUID and the command set (NVM)."""
    out = b""
    for kind, value in (
        (NIDT_EUI64, namespace.eui64),
        (NIDT_NGUID, namespace.nguid),
        (NIDT_UUID, namespace.uuid),
        (NIDT_CSI, b"\0"),
    ):
        out += struct.pack("<BBH", kind, len(value), 0) + value
    return out.ljust(IDENTIFY_SIZE, b"\0")


@dataclass
class ErrorEntry:
    """One entry of the Error Information log."""

    count: int
    sqid: int
    cid: int
    status: int
    lba: int
    nsid: int


def error_log(entries: Sequence[ErrorEntry]) -> bytes:
    """Newest first, as the specification orders them; ``ERROR_LOG_ENTRIES`` entries long."""
    out = b"".join(
        pack(
            ERROR_ENTRY,
            ERROR_ENTRY_SIZE,
            {
                "error_count": e.count,
                "sqid": e.sqid,
                "cid": e.cid,
                "status": e.status << 1,
                "parameter_location": 0xFFFF,
                "lba": e.lba,
                "nsid": e.nsid,
            },
        )
        for e in reversed(entries)
    )
    return out.ljust(ERROR_LOG_ENTRIES * ERROR_ENTRY_SIZE, b"\0")


@dataclass
class Health:
    """The counters of the SMART / Health Information log."""

    bytes_read: int = 0
    bytes_written: int = 0
    read_commands: int = 0
    write_commands: int = 0
    media_errors: int = 0
    errors: int = 0


def smart_log(health: Health, over_temperature: int) -> bytes:
    # data units are thousands of 512-byte units, rounded up
    units = 512 * 1000
    return pack(
        SMART_LOG,
        LOG_PAGE_SIZE,
        {
            "critical_warning": 0x02 if TEMPERATURE >= over_temperature else 0,
            "temperature": TEMPERATURE,
            "available_spare": 100,
            "available_spare_threshold": 10,
            "data_units_read": -(-health.bytes_read // units),
            "data_units_written": -(-health.bytes_written // units),
            "host_read_commands": health.read_commands,
            "host_write_commands": health.write_commands,
            "power_cycles": 1,
            "media_errors": health.media_errors,
            "error_log_entries": health.errors,
        },
    )


def firmware_slot_log() -> bytes:
    return pack(FIRMWARE_SLOT_LOG, LOG_PAGE_SIZE, {"afi": 1, "frs1": FIRMWARE_REVISION})


def changed_namespace_log(nsids: Iterable[int]) -> bytes:
    """Up to 1024 changed namespace IDs; more than that is reported as the single entry FFFFFFFFh."""
    changed = sorted(nsids)
    if len(changed) > 1024:
        changed = [0xFFFF_FFFF]
    return struct.pack(f"<{len(changed)}I", *changed).ljust(4096, b"\0")
