"""Malformed vfio-user messages, each a distinct way for a client to be wrong.

Every case is raw bytes (and maybe fds) sent on a fresh connection, with or
without a VERSION negotiation first.  The generators below cover: truncated
and lying headers, unknown commands, replies where requests belong, wrong fd
counts, absurd counts, offsets and region indices, bad DMA maps, bogus
SET_IRQS ranges, broken VERSION JSON, and requests whose payload is too
short for their command.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

HEADER = struct.Struct("=HHIII")
VERSION, DMA_MAP, DMA_UNMAP, GET_INFO, REGION_INFO, IO_FDS, IRQ_INFO, SET_IRQS = range(1, 9)
REGION_READ, REGION_WRITE, DMA_READ, DMA_WRITE, RESET = 9, 10, 11, 12, 13
NO_REPLY, ERROR = 0x10, 0x20
IGNORED_CAPS = "libvfio-user ignores capabilities it cannot use"
FDS_IGNORED = "fds on a command that takes none are closed and ignored"
DMA_UNCHECKED = "DMA_MAP ranges and flags are not validated by this revision"


@dataclass(frozen=True)
class Case:
    """One bad message."""

    name: str
    data: bytes
    negotiate: bool = True
    fd_count: int = 0
    expect_silence: bool = False  # a NO_REPLY command may rightly get no answer
    #: Why libvfio-user (0b28d205) answers this one with success; empty when it must not.
    lenient: str = ""

    def fds(self) -> list[int]:
        return [os.memfd_create(f"bad-{i}", os.MFD_CLOEXEC) for i in range(self.fd_count)]


def message(
    command: int, payload: bytes = b"", *, msg_id: int = 0x7000, flags: int = 0, size: int | None = None
) -> bytes:
    total = HEADER.size + len(payload) if size is None else size
    return HEADER.pack(msg_id, command, total, flags, 0) + payload


def version_json(text: bytes, major: int = 0, minor: int = 1) -> bytes:
    return struct.pack("=HH", major, minor) + text


def region_access(region: int, offset: int, count: int, data: bytes = b"") -> bytes:
    return struct.pack("=QII", offset, region, count) + data


def dma_map(address: int, size: int, flags: int = 3, offset: int = 0, argsz: int = 32) -> bytes:
    return struct.pack("=IIQQQ", argsz, flags, offset, address, size)


def set_irqs(flags: int, index: int, start: int, count: int, argsz: int = 20, data: bytes = b"") -> bytes:
    return struct.pack("=IIIII", argsz, flags, index, start, count) + data


def all_cases() -> list[Case]:
    cases: list[Case] = []
    add = cases.append
    # Truncated headers, before and after negotiation.
    for length in range(1, 16):
        add(Case(f"header cut at {length} bytes", message(GET_INFO)[:length]))
        add(
            Case(
                f"first header cut at {length} bytes", message(VERSION, version_json(b"{}\0"))[:length], negotiate=False
            )
        )
    # Sizes that lie about the body.
    for size in (0, 1, 8, 15, 17, 24, 1 << 20, (1 << 32) - 1):
        add(Case(f"GET_INFO with size {size}", message(GET_INFO, struct.pack("=III", 16, 0, 0), size=size)))
    for claimed in (40, 100, 4096):
        add(
            Case(
                f"REGION_READ claims {claimed} bytes, sends 20",
                message(REGION_READ, region_access(7, 0, 4), size=claimed),
            )
        )
    # Unknown and reserved commands.
    for command in (0, 14, 15, 16, 17, 18, 19, 20, 31, 100, 0x7FFF, 0xFFFF):
        add(Case(f"command {command}", message(command, b"\0" * 16)))
    # Replies (and error replies) where requests belong.
    for command in range(1, 14):
        add(Case(f"reply-typed {command}", message(command, b"\0" * 16, flags=1)))
        add(Case(f"error reply {command}", message(command, flags=1 | ERROR)))
    for type_bits in range(2, 16):
        add(Case(f"type bits {type_bits}", message(GET_INFO, struct.pack("=III", 16, 0, 0), flags=type_bits)))
    # VERSION gone wrong.
    for name, payload, why in (
        ("JSON that is not JSON", version_json(b"{not json\0"), ""),
        ("JSON not NUL-terminated", version_json(b'{"capabilities":{}}'), ""),
        ("JSON array", version_json(b"[1,2,3]\0"), IGNORED_CAPS),
        ("max_msg_fds a string", version_json(b'{"capabilities":{"max_msg_fds":"many"}}\0'), ""),
        ("negative max_data_xfer_size", version_json(b'{"capabilities":{"max_data_xfer_size":-1}}\0'), IGNORED_CAPS),
        ("huge max_msg_fds", version_json(b'{"capabilities":{"max_msg_fds":4294967296}}\0'), IGNORED_CAPS),
        ("major 1", version_json(b"{}\0", major=1), ""),
        ("major 65535", version_json(b"{}\0", major=0xFFFF), ""),
        ("no payload", b"", ""),
        ("two bytes", b"\0\0", ""),
        ("binary junk", bytes(range(256)), ""),
        ("deep nesting", version_json(b'{"a":' * 200 + b"1" + b"}" * 200 + b"\0"), ""),
    ):
        add(Case(f"VERSION: {name}", message(VERSION, payload), negotiate=False, lenient=why))
    add(Case("VERSION twice", message(VERSION, version_json(b"{}\0"))))
    add(Case("command before VERSION", message(GET_INFO, struct.pack("=III", 16, 0, 0)), negotiate=False))
    # Wrong fd counts.
    for fds in (1, 2, 8):
        add(Case(f"GET_INFO with {fds} fds", message(GET_INFO, struct.pack("=III", 16, 0, 0)), fd_count=fds))
        add(
            Case(
                f"REGION_READ with {fds} fds",
                message(REGION_READ, region_access(7, 0, 4)),
                fd_count=fds,
                lenient=FDS_IGNORED,
            )
        )
    for fds in (2, 3):
        add(
            Case(
                f"DMA_MAP with {fds} fds",
                message(DMA_MAP, dma_map(0x1000_0000, 0x1000)),
                fd_count=fds,
                lenient="the first fd is used, the others are closed",
            )
        )
    add(
        Case(
            "SET_IRQS eventfd data with 0 fds",
            message(SET_IRQS, set_irqs(0x4 | 0x20, 0, 0, 1)),
            lenient="eventfd data without fds disables the vectors, as count 0 would",
        )
    )
    add(Case("SET_IRQS 1 vector with 3 fds", message(SET_IRQS, set_irqs(0x4 | 0x20, 0, 0, 1)), fd_count=3))
    # Region accesses out of range.
    for region in (10, 11, 64, 255, 0xFFFF_FFFF):
        add(Case(f"REGION_READ region {region}", message(REGION_READ, region_access(region, 0, 4))))
        add(Case(f"REGION_WRITE region {region}", message(REGION_WRITE, region_access(region, 0, 4, b"\0" * 4))))
    for offset in (4096, 1 << 20, 1 << 32, 1 << 63, (1 << 64) - 4):
        add(Case(f"REGION_READ config offset {offset:#x}", message(REGION_READ, region_access(7, offset, 4))))
    for offset in (1 << 20, (1 << 20) - 2, 1 << 32, 1 << 63, (1 << 64) - 4):
        add(Case(f"REGION_READ BAR0 (1 MiB) offset {offset:#x}", message(REGION_READ, region_access(0, offset, 4))))
    for count in (0, 1 << 20, 1 << 31, (1 << 32) - 1):
        add(Case(f"REGION_READ count {count:#x}", message(REGION_READ, region_access(7, 0, count))))
    for count, data in ((8, b"\0" * 4), (4, b""), ((1 << 32) - 1, b"\0" * 4)):
        add(
            Case(
                f"REGION_WRITE count {count} with {len(data)} bytes",
                message(REGION_WRITE, region_access(0, 0, count, data)),
            )
        )
    for length in (0, 4, 12):
        add(Case(f"REGION_READ payload of {length} bytes", message(REGION_READ, region_access(7, 0, 4)[:length])))
    add(
        Case(
            "posted write to region 99",
            message(REGION_WRITE, region_access(99, 0, 4, b"\0" * 4), flags=NO_REPLY),
            expect_silence=True,
        )
    )
    # Region and IRQ info asked wrongly.
    for argsz in (0, 4, 15, 1 << 31):
        add(
            Case(
                f"REGION_INFO argsz {argsz}",
                message(REGION_INFO, struct.pack("=IIIIQQ", argsz, 0, 0, 0, 0, 0)),
                lenient="answered with the natural size" if argsz > 32 else "",
            )
        )
    for index in (10, 100, 0xFFFF_FFFF):
        add(Case(f"REGION_INFO index {index}", message(REGION_INFO, struct.pack("=IIIIQQ", 32, 0, index, 0, 0, 0))))
        add(Case(f"IRQ_INFO index {index}", message(IRQ_INFO, struct.pack("=IIII", 16, 0, index, 0))))
        add(Case(f"IO_FDS index {index}", message(IO_FDS, struct.pack("=IIII", 16, 0, index, 0))))
    add(Case("REGION_INFO short payload", message(REGION_INFO, b"\0" * 8)))
    add(Case("IRQ_INFO short payload", message(IRQ_INFO, b"\0" * 4)))
    # DMA maps that make no sense.
    for name, payload, why in (
        ("size 0", dma_map(0x1000_0000, 0), DMA_UNCHECKED),
        ("unaligned address", dma_map(0x1000_0001, 0x1000), DMA_UNCHECKED),
        ("unaligned size", dma_map(0x1000_0000, 0x1001), DMA_UNCHECKED),
        ("address overflow", dma_map((1 << 64) - 0x1000, 0x2000), DMA_UNCHECKED),
        ("size 2**63", dma_map(0, 1 << 63), ""),
        ("no read or write", dma_map(0x1000_0000, 0x1000, flags=0), DMA_UNCHECKED),
        ("unknown flags", dma_map(0x1000_0000, 0x1000, flags=0xFFFF_FFFF), ""),
        ("argsz 0", dma_map(0x1000_0000, 0x1000, argsz=0), ""),
        ("argsz huge", dma_map(0x1000_0000, 0x1000, argsz=1 << 31), DMA_UNCHECKED),
        ("short payload", dma_map(0x1000_0000, 0x1000)[:12], ""),
    ):
        add(Case(f"DMA_MAP {name}", message(DMA_MAP, payload), lenient=why))
    for name, payload in (
        ("never mapped", dma_map(0x2000_0000, 0x1000)),
        ("size 0", dma_map(0x2000_0000, 0)),
        ("everything", dma_map(0, (1 << 64) - 1)),
        ("short payload", b"\0" * 8),
    ):
        add(Case(f"DMA_UNMAP {name}", message(DMA_UNMAP, payload)))
    # SET_IRQS nonsense.
    for name, payload in (
        ("index 5", set_irqs(0x1 | 0x20, 5, 0, 1)),
        ("index 0xffffffff", set_irqs(0x1 | 0x20, 0xFFFF_FFFF, 0, 1)),
        ("start beyond count", set_irqs(0x1 | 0x20, 0, 7, 1)),
        ("start+count overflow", set_irqs(0x1 | 0x20, 0, 0xFFFF_FFFF, 2)),
        ("count huge", set_irqs(0x1 | 0x20, 2, 0, 1 << 30)),
        ("two data kinds", set_irqs(0x1 | 0x2 | 0x20, 0, 0, 1)),
        ("two actions", set_irqs(0x1 | 0x8 | 0x10 | 0x20, 0, 0, 1)),
        ("no action", set_irqs(0x1, 0, 0, 1)),
        ("bool data missing", set_irqs(0x2 | 0x20, 0, 0, 1)),
        ("argsz too small", set_irqs(0x1 | 0x20, 0, 0, 1, argsz=4)),
        ("short payload", set_irqs(0x1 | 0x20, 0, 0, 1)[:8]),
        ("MSI-X vector out of range", set_irqs(0x1 | 0x20, 2, 100, 1)),
    ):
        add(Case(f"SET_IRQS {name}", message(SET_IRQS, payload)))
    # Server-to-client commands sent by the client.
    for command in (DMA_READ, DMA_WRITE):
        add(Case(f"client sends command {command}", message(command, struct.pack("=QQ", 0, 4) + b"\0" * 4)))
    add(Case("DEVICE_RESET with a payload", message(RESET, b"\0" * 64), lenient="the payload is ignored"))
    add(Case("GET_INFO argsz 0", message(GET_INFO, struct.pack("=III", 0, 0, 0))))
    add(Case("GET_INFO no payload", message(GET_INFO)))
    # The same id twice in a row, and garbage flag bits.
    add(Case("garbage flag bits", message(GET_INFO, struct.pack("=III", 16, 0, 0), flags=0xFFFF_FF00)))
    good = message(GET_INFO, struct.pack("=III", 16, 0, 0))
    add(Case("a good request then a truncated one", good + message(REGION_READ, region_access(7, 0, 4))[:20]))
    add(Case("a good request then an unknown command", good + message(0x4242)))
    add(Case("message id 0xffff with size 0", message(GET_INFO, msg_id=0xFFFF, size=0)))
    for argsz in (0, 8, 1 << 31):
        add(Case(f"IO_FDS argsz {argsz}", message(IO_FDS, struct.pack("=IIII", argsz, 0, 0, 0))))
    add(
        Case(
            "REGION_WRITE to config, count 4096 at 4095",
            message(REGION_WRITE, region_access(7, 4095, 4096, b"\xff" * 4096)),
        )
    )
    add(Case("REGION_READ of the migration region", message(REGION_READ, region_access(9, 0, 8))))
    add(Case("all ones", b"\xff" * 64, expect_silence=True))
    add(Case("all zeros", b"\0" * 64))
    return cases
