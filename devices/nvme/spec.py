"""The parts of NVMe Base Specification 1.4 the controller implements, as data.

Register fields, opcodes, status codes, feature and log page identifiers,
and the byte layouts of the data structures the controller returns.  A
layout is a table of ``(name, offset, struct format)`` rows, so that each
structure reads like the specification's figure and is packed by one
function, :func:`pack`.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# -- controller registers (BAR0) ----------------------------------------------------------

REG_CAP = 0x00
REG_VS = 0x08
REG_INTMS = 0x0C
REG_INTMC = 0x10
REG_CC = 0x14
REG_CSTS = 0x1C
REG_AQA = 0x24
REG_ASQ = 0x28
REG_ACQ = 0x30
DOORBELLS = 0x1000

VERSION_1_4 = 0x0001_0400

CC_EN = 1 << 0
CC_CSS_SHIFT, CC_CSS_MASK = 4, 0x7
CC_MPS_SHIFT, CC_MPS_MASK = 7, 0xF
CC_SHN_SHIFT, CC_SHN_MASK = 14, 0x3
CC_IOSQES_SHIFT, CC_IOCQES_SHIFT = 16, 20

CSTS_RDY = 1 << 0
CSTS_CFS = 1 << 1
CSTS_SHST_SHIFT = 2
SHST_NORMAL, SHST_OCCURRING, SHST_COMPLETE = 0, 1, 2

SQ_ENTRY_SIZE = 64
CQ_ENTRY_SIZE = 16
#: CC.IOSQES / CC.IOCQES as log2 of the entry sizes above.
IOSQES, IOCQES = 6, 4
PAGE_SHIFT_MIN = 12


def cap(*, mqes: int, timeout_500ms: int, dstrd: int, mpsmax: int = 0) -> int:
    """The CAP register: queue size, CQR (contiguous queues required), AMS none, TO, DSTRD, NVM command set, MPS."""
    value = mqes & 0xFFFF
    value |= 1 << 16  # CQR: queues must be physically contiguous
    value |= (timeout_500ms & 0xFF) << 24
    value |= (dstrd & 0xF) << 32
    value |= 1 << 37  # CSS: the NVM command set
    value |= 0 << 48  # MPSMIN: 4 KiB
    value |= (mpsmax & 0xF) << 52
    return value


# -- commands ---------------------------------------------------------------------------------


class AdminOpcode(enum.IntEnum):
    DELETE_SQ = 0x00
    CREATE_SQ = 0x01
    GET_LOG_PAGE = 0x02
    DELETE_CQ = 0x04
    CREATE_CQ = 0x05
    IDENTIFY = 0x06
    ABORT = 0x08
    SET_FEATURES = 0x09
    GET_FEATURES = 0x0A
    ASYNC_EVENT_REQUEST = 0x0C


class IoOpcode(enum.IntEnum):
    FLUSH = 0x00
    WRITE = 0x01
    READ = 0x02
    WRITE_ZEROES = 0x08
    DATASET_MANAGEMENT = 0x09


class Cns(enum.IntEnum):
    """Identify's Controller or Namespace Structure (CDW10 bits 7:0)."""

    NAMESPACE = 0x00
    CONTROLLER = 0x01
    ACTIVE_NAMESPACES = 0x02
    NAMESPACE_DESCRIPTORS = 0x03
    #: I/O command set specific controller data (NVMe 2.0); Linux asks for it with CSI 0 (NVM).
    CSI_CONTROLLER = 0x06


class FeatureId(enum.IntEnum):
    ARBITRATION = 0x01
    POWER_MANAGEMENT = 0x02
    TEMPERATURE_THRESHOLD = 0x04
    ERROR_RECOVERY = 0x05
    VOLATILE_WRITE_CACHE = 0x06
    NUMBER_OF_QUEUES = 0x07
    INTERRUPT_COALESCING = 0x08
    INTERRUPT_VECTOR_CONFIGURATION = 0x09
    WRITE_ATOMICITY = 0x0A
    ASYNC_EVENT_CONFIGURATION = 0x0B


class LogPage(enum.IntEnum):
    ERROR = 0x01
    SMART = 0x02
    FIRMWARE_SLOT = 0x03
    CHANGED_NAMESPACES = 0x04


class AsyncEventType(enum.IntEnum):
    ERROR = 0
    SMART = 1
    NOTICE = 2


#: Asynchronous event information for type ERROR and NOTICE.
AEN_ERROR_INVALID_DOORBELL = 0x00
AEN_ERROR_INVALID_DOORBELL_VALUE = 0x01
AEN_NOTICE_NAMESPACE_ATTRIBUTE_CHANGED = 0x00
#: Async Event Configuration bit enabling namespace attribute notices.
AEC_NAMESPACE_ATTRIBUTE = 1 << 8


# -- status ---------------------------------------------------------------------------------


class Status(enum.IntEnum):
    """Status codes as the 11-bit (SCT << 8 | SC) value of the completion's status field."""

    SUCCESS = 0x000
    INVALID_OPCODE = 0x001
    INVALID_FIELD = 0x002
    COMMAND_ID_CONFLICT = 0x003
    DATA_TRANSFER_ERROR = 0x004
    ABORTED_POWER_LOSS = 0x005
    INTERNAL_ERROR = 0x006
    ABORT_REQUESTED = 0x007
    ABORTED_SQ_DELETION = 0x008
    INVALID_NAMESPACE = 0x00B
    COMMAND_SEQUENCE_ERROR = 0x00C
    PRP_OFFSET_INVALID = 0x013
    LBA_OUT_OF_RANGE = 0x080
    CAPACITY_EXCEEDED = 0x081
    NAMESPACE_NOT_READY = 0x082
    # command specific (SCT 1)
    COMPLETION_QUEUE_INVALID = 0x100
    INVALID_QUEUE_IDENTIFIER = 0x101
    INVALID_QUEUE_SIZE = 0x102
    ABORT_LIMIT_EXCEEDED = 0x103
    ASYNC_EVENT_LIMIT_EXCEEDED = 0x105
    INVALID_LOG_PAGE = 0x109
    INVALID_INTERRUPT_VECTOR = 0x108
    INVALID_QUEUE_DELETION = 0x10C
    FEATURE_NOT_SAVEABLE = 0x10D
    # media and data integrity errors (SCT 2)
    WRITE_FAULT = 0x280
    UNRECOVERED_READ_ERROR = 0x281

    @property
    def sct(self) -> int:
        return self.value >> 8

    @property
    def sc(self) -> int:
        return self.value & 0xFF


#: The Do Not Retry bit, in the 15-bit status field (bits 31:17 of CQE DW3, shifted down by 17).
DNR = 1 << 14


def status_field(code: int, *, dnr: bool) -> int:
    """The completion's 15-bit status field for ``code`` (SCT << 8 | SC), with Do Not Retry."""
    return (code & 0x7FF) | (DNR if dnr else 0)


# -- data structures -----------------------------------------------------------------------


@dataclass(frozen=True)
class StructField:
    """One member of a data structure: where it is and how it is encoded (a struct format)."""

    name: str
    offset: int
    format: str


Layout = Sequence[StructField]


def pack(layout: Layout, size: int, values: Mapping[str, Any]) -> bytes:
    """The ``size``-byte structure with ``values`` at their fields; unnamed bytes stay zero.

    Strings (``s`` formats) are ASCII, space-padded as NVMe requires; a name
    the layout does not know is an error, so a typo cannot silently vanish.
    """
    by_name = {f.name: f for f in layout}
    unknown = set(values) - set(by_name)
    if unknown:
        raise KeyError(f"no field {', '.join(sorted(unknown))} in this structure")
    out = bytearray(size)
    for name, value in values.items():
        f = by_name[name]
        if f.format.endswith("s") and isinstance(value, str):
            width = struct.calcsize(f.format)
            value = value.encode("ascii")[:width].ljust(width, b" ")
        struct.pack_into("<" + f.format, out, f.offset, value)
    return bytes(out)


def layout(*rows: tuple[str, int, str]) -> tuple[StructField, ...]:
    return tuple(StructField(*row) for row in rows)


#: A submission queue entry (common command format, Figure 105/106).
COMMAND = struct.Struct("<BBHIQQQQIIIIII")
#: A completion queue entry: DW0 result, DW1 reserved, SQ head, SQ id, command id, status | phase.
COMPLETION = struct.Struct("<IIHHHH")

IDENTIFY_SIZE = 4096

#: Identify Controller data structure (Figure 247), the fields this controller fills.
IDENTIFY_CONTROLLER = layout(
    ("vid", 0, "H"),
    ("ssvid", 2, "H"),
    ("sn", 4, "20s"),
    ("mn", 24, "40s"),
    ("fr", 64, "8s"),
    ("rab", 72, "B"),
    ("ieee", 73, "3s"),
    ("cmic", 76, "B"),
    ("mdts", 77, "B"),
    ("cntlid", 78, "H"),
    ("ver", 80, "I"),
    ("oaes", 92, "I"),
    ("ctratt", 96, "I"),
    ("cntrltype", 111, "B"),
    ("oacs", 256, "H"),
    ("acl", 258, "B"),
    ("aerl", 259, "B"),
    ("frmw", 260, "B"),
    ("lpa", 261, "B"),
    ("elpe", 262, "B"),
    ("npss", 263, "B"),
    ("wctemp", 266, "H"),
    ("cctemp", 268, "H"),
    ("sqes", 512, "B"),
    ("cqes", 513, "B"),
    ("maxcmd", 514, "H"),
    ("nn", 516, "I"),
    ("oncs", 520, "H"),
    ("fuses", 522, "H"),
    ("fna", 524, "B"),
    ("vwc", 525, "B"),
    ("awun", 526, "H"),
    ("awupf", 528, "H"),
    ("sgls", 536, "I"),
    ("subnqn", 768, "256s"),
    # power state descriptor 0: maximum power (centiwatts), entry/exit latency
    ("psd0_mp", 2048, "H"),
    ("psd0_enlat", 2052, "I"),
    ("psd0_exlat", 2056, "I"),
)

#: Identify Namespace data structure (Figure 245), NVM command set.
IDENTIFY_NAMESPACE = layout(
    ("nsze", 0, "Q"),
    ("ncap", 8, "Q"),
    ("nuse", 16, "Q"),
    ("nsfeat", 24, "B"),
    ("nlbaf", 25, "B"),
    ("flbas", 26, "B"),
    ("mc", 27, "B"),
    ("dpc", 28, "B"),
    ("dps", 29, "B"),
    ("nmic", 30, "B"),
    ("dlfeat", 33, "B"),
    ("nvmcap", 48, "16s"),
    ("nguid", 104, "16s"),
    ("eui64", 120, "8s"),
    # LBA format 0: metadata size, LBA data size (log2), relative performance
    ("lbaf0_ms", 128, "H"),
    ("lbaf0_lbads", 130, "B"),
    ("lbaf0_rp", 131, "B"),
)

#: Namespace Identification Descriptor types (Figure 249) and their lengths.
NIDT_EUI64, NIDT_NGUID, NIDT_UUID, NIDT_CSI = 1, 2, 3, 4

LOG_PAGE_SIZE = 512
ERROR_ENTRY_SIZE = 64

#: Error Information log entry (Figure 194).
ERROR_ENTRY = layout(
    ("error_count", 0, "Q"),
    ("sqid", 8, "H"),
    ("cid", 10, "H"),
    ("status", 12, "H"),
    ("parameter_location", 14, "H"),
    ("lba", 16, "Q"),
    ("nsid", 24, "I"),
)

#: SMART / Health Information log (Figure 196); 128-bit counters are packed as two 64-bit halves.
SMART_LOG = layout(
    ("critical_warning", 0, "B"),
    ("temperature", 1, "H"),
    ("available_spare", 3, "B"),
    ("available_spare_threshold", 4, "B"),
    ("percentage_used", 5, "B"),
    ("data_units_read", 32, "Q"),
    ("data_units_written", 48, "Q"),
    ("host_read_commands", 64, "Q"),
    ("host_write_commands", 80, "Q"),
    ("power_cycles", 112, "Q"),
    ("power_on_hours", 128, "Q"),
    ("unsafe_shutdowns", 144, "Q"),
    ("media_errors", 160, "Q"),
    ("error_log_entries", 176, "Q"),
)

#: Firmware Slot Information log (Figure 197).
FIRMWARE_SLOT_LOG = layout(
    ("afi", 0, "B"),
    ("frs1", 8, "8s"),
)
