"""A PCI conformance checker for config space, runnable on any device.

:func:`check_pci_conformance` drives config space through a
:class:`ConfigPort` — the bench, or :class:`vdev.client.Client` against any
vfio-user server — the way firmware and a driver would, and collects every
rule it finds broken:

* identity (vendor, device, revision, class, subsystem, header type,
  interrupt pin, capability pointer) is read-only, the vendor ID is valid
  and the header is type 0;
* COMMAND's reserved bits (11-15) read 0, its memory and I/O bits are
  writable when the device has BARs of that kind, and Interrupt Line keeps
  what software writes;
* STATUS: writing ones sets nothing, read-only bits do not move, reserved
  bits 0-2 read 0;
* every BAR sizes (all-ones in, size mask out) to a power of two of a
  legal size and type, keeps an address written to it, and gives back
  what was in it; a 64-bit BAR has a slot for its upper half; the
  expansion ROM sizes likewise;
* the capability chain (and the extended one of an Express device) is
  well formed: pointers dword-aligned and in bounds, no loops, headers
  read-only, known capabilities not overlapping; MSI and MSI-X control
  bits the device fixes are read-only; the MSI-X table and PBA lie inside
  memory BARs and do not overlap;
* header bytes 0x35-0x3b are reserved: they read 0 and keep reading 0.

Given the :class:`~vdev.Device` behind the port (``device=``), it also
compares what it observed with what the device declares (IDs, BARs, ROM,
capabilities in chain order, interrupt pin) and checks the RW1C bits —
STATUS's error bits, PCI Express Device Status — by setting them on the
device's side and clearing them one at a time from the client's.

The checker is a test: it rewrites COMMAND, the BARs, the ROM BAR,
Interrupt Line and capability control registers, and puts back what it
found; it clears RW1C status bits.  Run it on a freshly attached device.

    >>> import trio
    >>> from vdev.testing import check_pci_conformance, open_bench
    >>> from vdev_devices.idio16 import Idio16
    >>> async def main():
    ...     async with open_bench(Idio16()) as bench:
    ...         return await check_pci_conformance(bench, device=bench.device)
    >>> report = trio.run(main)
    >>> report.bars
    {2: SizedBar(index=2, kind=<BarKind.IO: 'io'>, size=256, prefetchable=False)}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from vdev.model.bars import BarKind
from vdev.model.capabilities import PCI_MSIX_FLAGS_ENABLE, PCI_MSIX_FLAGS_MASKALL
from vdev.model.device import Device
from vdev.model.pci_regs import (
    PCI_BASE_ADDRESS_0,
    PCI_CAPABILITY_LIST,
    PCI_COMMAND,
    PCI_COMMAND_IO,
    PCI_COMMAND_MEMORY,
    PCI_HEADER_TYPE,
    PCI_INTERRUPT_LINE,
    PCI_INTERRUPT_PIN,
    PCI_REVISION_ID,
    PCI_ROM_ADDRESS,
    PCI_STATUS,
    PCI_STATUS_CAP_LIST,
    PCI_SUBSYSTEM_VENDOR_ID,
    PCI_VENDOR_ID,
    STATUS_RW1C,
)

__all__ = ["ConfigPort", "ConformanceError", "ConformanceReport", "SizedBar", "check_pci_conformance"]

COMMAND_RESERVED = 0xF800
STATUS_RESERVED = 0x0007
CAP_ID_PM, CAP_ID_MSI, CAP_ID_VENDOR, CAP_ID_EXPRESS, CAP_ID_MSIX = 0x01, 0x05, 0x09, 0x10, 0x11
EXPRESS_DEVSTA = 0x0A
EXPRESS_DEVSTA_RW1C = 0x000F
EXTENDED_START, CONFIG_SIZE_EXPRESS = 0x100, 0x1000


class ConfigPort(Protocol):
    """Config space access as a client has it: :class:`~vdev.testing.Bench` and :class:`vdev.client.Client` are both."""

    async def config_read(self, offset: int, size: int = 4) -> int: ...

    async def config_write(self, offset: int, value: int, size: int = 4) -> None: ...


@dataclass(frozen=True)
class SizedBar:
    """A BAR as sizing it revealed: the address space, width and size software allocates for."""

    index: int
    kind: BarKind
    size: int
    prefetchable: bool


@dataclass(frozen=True)
class ConformanceReport:
    """What the checker found, for further assertions: BARs, ROM size and both capability chains.

    The chains are ``(offset, capability ID)`` pairs in chain order.
    """

    bars: dict[int, SizedBar]
    rom_size: int
    capabilities: tuple[tuple[int, int], ...]
    extended_capabilities: tuple[tuple[int, int], ...]


class ConformanceError(AssertionError):
    """Config space breaks PCI rules; :attr:`problems` lists each one, a line per rule broken."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__(f"{len(problems)} PCI conformance problem(s):\n" + "\n".join(f"- {p}" for p in problems))
        self.problems = problems


@dataclass
class _Check:
    port: ConfigPort
    problems: list[str] = field(default_factory=list)

    def fail(self, problem: str) -> None:
        self.problems.append(problem)

    async def read(self, offset: int, size: int) -> int:
        return await self.port.config_read(offset, size)

    async def write(self, offset: int, value: int, size: int) -> None:
        await self.port.config_write(offset, value & ((1 << (8 * size)) - 1), size)

    async def read_only(self, offset: int, size: int, what: str) -> int:
        """Check that writing the inverse of ``what`` changes nothing; return its value."""
        value = await self.read(offset, size)
        await self.write(offset, ~value, size)
        after = await self.read(offset, size)
        if after != value:
            self.fail(f"{what} at {offset:#x} is writable: {value:#x} became {after:#x}")
            await self.write(offset, value, size)
        return value


async def check_pci_conformance(port: ConfigPort, *, device: Device | None = None) -> ConformanceReport:
    """Check the config space behind ``port`` against PCI's rules; raise :class:`ConformanceError` listing all problems.

    ``device``, if given, is the model behind ``port`` (the bench's, or one
    served in this process): what was observed is compared with what it
    declares, and RW1C bits are checked by setting them on its side.
    """
    check = _Check(port)
    identity = await _identity(check)
    command = await check.read(PCI_COMMAND, 2)
    await check.write(PCI_COMMAND, command & ~(PCI_COMMAND_IO | PCI_COMMAND_MEMORY), 2)
    bars = await _bars(check)
    rom_size = await _rom(check)
    await _command(check, bars)
    await check.write(PCI_COMMAND, command, 2)
    await _status(check, device)
    await _interrupt_line_and_reserved(check)
    capabilities = await _capabilities(check, bars, device)
    extended: tuple[tuple[int, int], ...] = ()
    if any(cap_id == CAP_ID_EXPRESS for _, cap_id in capabilities):
        extended = await _extended_capabilities(check)
    if device is not None:
        _compare(check, device, identity, bars, rom_size, capabilities, extended)
    if check.problems:
        raise ConformanceError(check.problems)
    return ConformanceReport(bars, rom_size, capabilities, extended)


@dataclass(frozen=True)
class _Identity:
    ids: int
    revision_class: int
    subsystem: int
    pin: int


async def _identity(check: _Check) -> _Identity:
    ids = await check.read_only(PCI_VENDOR_ID, 4, "vendor and device ID")
    if ids & 0xFFFF in (0x0000, 0xFFFF):
        check.fail(f"vendor ID {ids & 0xFFFF:#06x} is not a valid vendor")
    revision_class = await check.read_only(PCI_REVISION_ID, 4, "revision and class code")
    subsystem = await check.read_only(PCI_SUBSYSTEM_VENDOR_ID, 4, "subsystem IDs")
    header_type = await check.read_only(PCI_HEADER_TYPE, 1, "header type")
    if header_type & 0x7F:
        check.fail(f"header type {header_type & 0x7F} is not 0 (an endpoint)")
    pin = await check.read_only(PCI_INTERRUPT_PIN, 1, "interrupt pin")
    if pin > 4:
        check.fail(f"interrupt pin {pin} is not 0 (none) or 1-4 (INTA-INTD)")
    await check.read_only(PCI_CAPABILITY_LIST, 1, "capability pointer")
    return _Identity(ids, revision_class, subsystem, pin)


async def _probe(check: _Check, offset: int, probe: int = 0xFFFFFFFF) -> tuple[int, int]:
    """(original, value read after writing ``probe``) of a BAR register; the original is put back."""
    original = await check.read(offset, 4)
    await check.write(offset, probe, 4)
    sized = await check.read(offset, 4)
    await check.write(offset, original, 4)
    if await check.read(offset, 4) != original:
        check.fail(f"BAR register at {offset:#x} does not give back {original:#x} after sizing")
    return original, sized


async def _bars(check: _Check) -> dict[int, SizedBar]:
    bars: dict[int, SizedBar] = {}
    index = 0
    while index < 6:
        at = PCI_BASE_ADDRESS_0 + 4 * index
        _, sized = await _probe(check, at)
        if sized == 0:
            index += 1
            continue
        bar = await _size_bar(check, index, sized)
        if bar is not None:
            bars[index] = bar
            await _address_round_trip(check, bar)
        index += 2 if bar is not None and bar.kind is BarKind.MEM64 else 1
    return bars


async def _size_bar(check: _Check, index: int, sized: int) -> SizedBar | None:
    if sized & 0x1:
        mask = sized & 0xFFFFFFFC
        if sized & 0x2:
            check.fail(f"BAR{index}: reserved bit 1 of an I/O BAR is set")
        if not mask & 0xFFFF0000:
            mask |= 0xFFFF0000  # a BAR decoding 16 address bits
        size = (~mask & 0xFFFFFFFF) + 1
        kind, prefetchable, minimum = BarKind.IO, False, 4
    else:
        memory_type = sized >> 1 & 0x3
        prefetchable = bool(sized & 0x8)
        if memory_type not in (0, 2):
            check.fail(f"BAR{index}: memory type {memory_type} is reserved")
            return None
        mask = sized & 0xFFFFFFF0
        kind, minimum = BarKind.MEM32, 16
        if memory_type == 2:
            kind = BarKind.MEM64
            if index == 5:
                check.fail("BAR5 is 64-bit but has no slot for its upper half")
                return None
            _, upper = await _probe(check, PCI_BASE_ADDRESS_0 + 4 * (index + 1))
            mask |= upper << 32
            size = (~mask & 0xFFFF_FFFF_FFFF_FFFF) + 1
        else:
            size = (~mask & 0xFFFFFFFF) + 1
    if size & (size - 1) or size < minimum:
        check.fail(f"BAR{index} ({kind.value}) sizes to {size:#x}, not a power of two of at least {minimum}")
        return None
    return SizedBar(index, kind, size, prefetchable)


async def _address_round_trip(check: _Check, bar: SizedBar) -> None:
    """A BAR keeps an address aligned to its size (here: its size itself)."""
    at = PCI_BASE_ADDRESS_0 + 4 * bar.index
    original = await check.read(at, 4)
    flags = original & (0x3 if bar.kind is BarKind.IO else 0xF)
    await check.write(at, (bar.size & 0xFFFFFFFF) | flags, 4)
    kept = await check.read(at, 4)
    await check.write(at, original, 4)
    if kept != (bar.size & 0xFFFFFFFF) | flags:
        check.fail(f"BAR{bar.index} does not keep the address {bar.size & 0xFFFFFFFF:#x}: reads {kept:#x}")


async def _rom(check: _Check) -> int:
    _, sized = await _probe(check, PCI_ROM_ADDRESS, 0xFFFFF800)
    mask = sized & 0xFFFFF800
    if not mask:
        return 0
    size = (~mask & 0xFFFFFFFF) + 1
    if size & (size - 1) or size < 2048:
        check.fail(f"the expansion ROM sizes to {size:#x}, not a power of two of at least 2 KiB")
    return size


async def _command(check: _Check, bars: dict[int, SizedBar]) -> None:
    await check.write(PCI_COMMAND, 0xFFFF, 2)
    value = await check.read(PCI_COMMAND, 2)
    if value & COMMAND_RESERVED:
        check.fail(f"COMMAND reserved bits read {value & COMMAND_RESERVED:#06x} after writing ones")
    kinds = {bar.kind for bar in bars.values()}
    if kinds & {BarKind.MEM32, BarKind.MEM64} and not value & PCI_COMMAND_MEMORY:
        check.fail("COMMAND's memory enable bit cannot be set, though the device has memory BARs")
    if BarKind.IO in kinds and not value & PCI_COMMAND_IO:
        check.fail("COMMAND's I/O enable bit cannot be set, though the device has I/O BARs")


async def _status(check: _Check, device: Device | None) -> None:
    before = await check.read(PCI_STATUS, 2)
    if before & STATUS_RESERVED:
        check.fail(f"STATUS reserved bits 0-2 read {before & STATUS_RESERVED:#x}")
    await check.write(PCI_STATUS, 0xFFFF, 2)
    after = await check.read(PCI_STATUS, 2)
    if after & ~before:
        check.fail(f"writing ones to STATUS set bits {after & ~before:#06x}")
    if (after ^ before) & ~STATUS_RW1C:
        check.fail(f"writing ones to STATUS changed read-only bits {(after ^ before) & ~STATUS_RW1C:#06x}")
    if device is not None:
        await _rw1c(check, device, PCI_STATUS, STATUS_RW1C, "STATUS")


async def _rw1c(check: _Check, device: Device, offset: int, bits: int, what: str) -> None:
    """Set ``bits`` on the device's side; clear them one at a time from the client's."""
    config = device.config
    config.write_int(offset, 2, config.read_int(offset, 2) | bits)
    await check.write(offset, 0, 2)
    if await check.read(offset, 2) & bits != bits:
        check.fail(f"{what}: writing 0 cleared RW1C bits")
    remaining = await check.read(offset, 2) & bits
    for bit in range(16):
        if not remaining >> bit & 1:
            continue
        await check.write(offset, 1 << bit, 2)
        value = await check.read(offset, 2) & bits
        if value & (1 << bit):
            check.fail(f"{what}: writing 1 to RW1C bit {bit} does not clear it")
        others = remaining & ~(1 << bit)
        if value & ~(1 << bit) != others:
            check.fail(f"{what}: writing 1 to bit {bit} changed other RW1C bits ({others:#06x} became {value:#06x})")
        remaining = value


async def _interrupt_line_and_reserved(check: _Check) -> None:
    line = await check.read(PCI_INTERRUPT_LINE, 1)
    await check.write(PCI_INTERRUPT_LINE, 0x5A, 1)
    if await check.read(PCI_INTERRUPT_LINE, 1) != 0x5A:
        check.fail("Interrupt Line does not keep what software writes")
    await check.write(PCI_INTERRUPT_LINE, line, 1)
    for offset in range(0x35, 0x3C):
        if await check.read(offset, 1):
            check.fail(f"reserved header byte {offset:#x} is not 0")
            continue
        await check.write(offset, 0xFF, 1)
        if await check.read(offset, 1):
            check.fail(f"reserved header byte {offset:#x} is writable")


async def _capability_size(check: _Check, at: int, cap_id: int) -> int:
    """Bytes a standard capability occupies, for the ones whose layout is known (else its 2-byte header)."""
    if cap_id == CAP_ID_PM:
        return 8
    if cap_id == CAP_ID_MSIX:
        return 12
    if cap_id == CAP_ID_EXPRESS:
        version = (await check.read(at + 2, 2)) & 0xF
        return 0x3C if version >= 2 else 0x24
    if cap_id == CAP_ID_VENDOR:
        return max(3, await check.read(at + 2, 1))
    if cap_id == CAP_ID_MSI:
        control = await check.read(at + 2, 2)
        size = 14 if control & 0x80 else 10
        return size + 10 if control & 0x100 else size
    return 2


async def _capabilities(check: _Check, bars: dict[int, SizedBar], device: Device | None) -> tuple[tuple[int, int], ...]:
    status = await check.read(PCI_STATUS, 2)
    pointer = await check.read(PCI_CAPABILITY_LIST, 1)
    if not status & PCI_STATUS_CAP_LIST:
        return ()
    if pointer == 0:
        check.fail("STATUS says there is a capability list, but the capability pointer is 0")
    chain: list[tuple[int, int]] = []
    spans: list[tuple[int, int, int]] = []
    while pointer:
        if pointer < 0x40 or pointer > 0xFC or pointer & 0x3:
            check.fail(f"capability pointer {pointer:#x} is outside 0x40-0xfc or not dword-aligned")
            break
        if any(at == pointer for at, _ in chain):
            check.fail(f"the capability chain loops back to {pointer:#x}")
            break
        header = await check.read_only(pointer, 2, "capability header")
        cap_id, following = header & 0xFF, header >> 8
        chain.append((pointer, cap_id))
        size = await _capability_size(check, pointer, cap_id)
        if pointer + size > 0x100:
            check.fail(f"capability {cap_id:#x} at {pointer:#x} ({size} bytes) runs past 0xff")
        spans.append((pointer, pointer + size, cap_id))
        if cap_id == CAP_ID_MSI:
            await _msi(check, pointer)
        elif cap_id == CAP_ID_MSIX:
            await _msix(check, pointer, bars)
        elif cap_id == CAP_ID_EXPRESS and device is not None:
            await _rw1c(check, device, pointer + EXPRESS_DEVSTA, EXPRESS_DEVSTA_RW1C, "PCI Express Device Status")
        pointer = following
    spans.sort()
    for (start, end, first), (next_start, _, second) in zip(spans, spans[1:]):
        if next_start < end:
            check.fail(f"capability {first:#x} at {start:#x} overlaps capability {second:#x} at {next_start:#x}")
    return tuple(chain)


async def _msi(check: _Check, at: int) -> None:
    """MSI: the capable-vectors, 64-bit and per-vector-mask bits are the device's, not the client's."""
    control = await check.read(at + 2, 2)
    fixed = 0x018E  # multiple message capable, 64-bit, per-vector masking
    await check.write(at + 2, (control & ~fixed) | (~control & fixed), 2)
    after = await check.read(at + 2, 2)
    await check.write(at + 2, control, 2)
    if (after ^ control) & fixed:
        check.fail(f"MSI control bits {((after ^ control) & fixed):#06x} at {at + 2:#x} are writable")


async def _msix(check: _Check, at: int, bars: dict[int, SizedBar]) -> None:
    """MSI-X: table size read-only; table and PBA inside memory BARs, not overlapping."""
    control = await check.read(at + 2, 2)
    await check.write(at + 2, (control & (PCI_MSIX_FLAGS_ENABLE | PCI_MSIX_FLAGS_MASKALL)) | (~control & 0x07FF), 2)
    after = await check.read(at + 2, 2)
    await check.write(at + 2, control, 2)
    if (after ^ control) & 0x07FF:
        check.fail(f"MSI-X table size at {at + 2:#x} is writable")
    vectors = (control & 0x7FF) + 1
    table = await check.read_only(at + 4, 4, "MSI-X table offset/BIR")
    pba = await check.read_only(at + 8, 4, "MSI-X PBA offset/BIR")
    places = []
    for what, value, size in (("table", table, 16 * vectors), ("PBA", pba, 8 * ((vectors + 63) // 64))):
        bir, offset = value & 0x7, value & ~0x7
        bar = bars.get(bir)
        if bar is None or bar.kind is BarKind.IO:
            check.fail(f"MSI-X {what} is in BAR{bir}, which is not a memory BAR")
            continue
        if offset + size > bar.size:
            check.fail(f"MSI-X {what} ({offset:#x}+{size:#x}) does not fit in BAR{bir} ({bar.size:#x} bytes)")
        places.append((bir, offset, offset + size))
    if len(places) == 2 and places[0][0] == places[1][0]:
        (_, table_start, table_end), (_, pba_start, pba_end) = places
        if table_start < pba_end and pba_start < table_end:
            check.fail("the MSI-X table and PBA overlap")


async def _extended_capabilities(check: _Check) -> tuple[tuple[int, int], ...]:
    header = await check.read(EXTENDED_START, 4)
    if header in (0, 0xFFFFFFFF):
        return ()
    chain: list[tuple[int, int]] = []
    pointer = EXTENDED_START
    while pointer:
        if pointer < EXTENDED_START or pointer > CONFIG_SIZE_EXPRESS - 4 or pointer & 0x3:
            check.fail(f"extended capability pointer {pointer:#x} is outside 0x100-0xffc or not dword-aligned")
            break
        if any(at == pointer for at, _ in chain):
            check.fail(f"the extended capability chain loops back to {pointer:#x}")
            break
        header = await check.read_only(pointer, 4, "extended capability header")
        chain.append((pointer, header & 0xFFFF))
        pointer = header >> 20
    return tuple(chain)


def _compare(
    check: _Check,
    device: Device,
    identity: _Identity,
    bars: dict[int, SizedBar],
    rom_size: int,
    capabilities: tuple[tuple[int, int], ...],
    extended: tuple[tuple[int, int], ...],
) -> None:
    """What was observed against what ``device`` declares."""
    for what, observed, declared_value in (
        ("vendor:device", identity.ids, device.device_id << 16 | device.vendor_id),
        ("class:revision", identity.revision_class, device.class_code << 8 | device.revision),
        ("subsystem", identity.subsystem, device.subsystem_id << 16 | device.subsystem_vendor_id),
        ("interrupt pin", identity.pin, 1 if device.intx else 0),
    ):
        if observed != declared_value:
            check.fail(f"{what} reads {observed:#x}, declared {declared_value:#x}")
    declared = {state.index: state.spec for state in device.bars()}
    for index in sorted(set(declared) | set(bars)):
        spec, seen = declared.get(index), bars.get(index)
        if spec is None:
            check.fail(f"BAR{index} sizes to {seen}, but the device declares no BAR{index}")
        elif seen is None:
            check.fail(f"BAR{index} ({spec.kind.value}, {spec.size:#x} bytes) is declared but does not size")
        elif (seen.kind, seen.size, seen.prefetchable) != (spec.kind, spec.size, spec.prefetchable):
            check.fail(
                f"BAR{index} sizes as {seen.kind.value} {seen.size:#x} bytes prefetchable={seen.prefetchable}, "
                f"declared {spec.kind.value} {spec.size:#x} bytes prefetchable={spec.prefetchable}"
            )
    if rom_size != device.rom_size:
        check.fail(f"the expansion ROM sizes to {rom_size:#x} bytes, declared {device.rom_size:#x}")
    config = device.config
    standard = [p.capability.cap_id for p in config.capabilities if not p.capability.extended]
    if [cap_id for _, cap_id in capabilities] != standard:
        check.fail(f"capability chain {[hex(c) for _, c in capabilities]}, declared {[hex(c) for c in standard]}")
    declared_extended = [p.capability.cap_id for p in config.capabilities if p.capability.extended]
    if [cap_id for _, cap_id in extended] != declared_extended:
        check.fail(
            f"extended capability chain {[hex(c) for _, c in extended]}, declared {[hex(c) for c in declared_extended]}"
        )
