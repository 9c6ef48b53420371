"""PCI capabilities as typed objects whose registers are declared as data, laid out by the framework.

A device lists capability objects; :mod:`vdev.model.config` places them in
config space and links the chain, so no device ever writes an offset or a
"next" pointer by hand.  Each capability declares its registers
(:meth:`Capability.registers`) with the vocabulary BAR registers use
(:class:`~vdev.model.registers.Register`, :class:`~vdev.model.registers.Field`,
:class:`~vdev.model.registers.Access`), offsets counted from the
capability's first byte, and draws their layout in its docstring the way the
PCI specifications draw them.  From the declaration come the reset bytes
(each register's ``reset``), the write mask (``RW`` bits) and the clear mask
(``RW1C`` bits); bits no field makes writable are read-only.  A ``WO`` bit
is a command: the client's write is acted on and never stored, so it reads
back 0 (Initiate Function Level Reset).

Code that needs a register or a bit finds it by name — through
:meth:`PlacedCapability.register <vdev.model.config.PlacedCapability.register>`
and :meth:`Register.field <vdev.model.registers.Register.field>` — never by
offset arithmetic.  The header (ID and next pointer; an extended
capability's 32-bit header) is declared too, and the layout fills it in.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vdev.model.registers import RO, RW, RW1C, WO, Access, Field, Register

#: Message Control bits of MSI and MSI-X, for code that reads config space as a client does
#: (the conformance checker, tests); device-side code looks the fields up by name.
PCI_MSI_FLAGS_ENABLE = 0x0001
PCI_MSIX_FLAGS_ENABLE = 0x8000
PCI_MSIX_FLAGS_MASKALL = 0x4000


class Capability:
    """A standard capability (in the first 256 bytes, 8-bit ID).

    Subclasses declare :meth:`body` (the registers after the header) and,
    when they carry opaque read-only bytes after those, :meth:`trailer`.
    """

    cap_id: int = 0
    extended = False

    def header(self) -> tuple[Register, ...]:
        """The capability header: ID and next pointer, filled in by the layout."""
        return (
            Register("cap_id", 0x0, width=1, access=RO, reset=self.cap_id),
            Register("next", 0x1, width=1, access=RO),
        )

    def body(self) -> tuple[Register, ...]:
        """The registers after the header, offsets from the capability's start."""
        return ()

    def trailer(self) -> bytes:
        """Read-only bytes after the last register (a vendor capability's data).  Default: none."""
        return b""

    def registers(self) -> tuple[Register, ...]:
        """Every declared register, header first, offsets from the capability's start."""
        return self.header() + self.body()

    @property
    def size(self) -> int:
        return max(r.end for r in self.registers()) + len(self.trailer())

    def image(self) -> bytes:
        """The capability's bytes at reset, header included (its pointers are filled in later)."""
        out = bytearray(self.size)
        for register in self.registers():
            out[register.offset : register.end] = register.reset.to_bytes(register.width, "little")
        end = max(r.end for r in self.registers())
        out[end:] = self.trailer()
        return bytes(out)

    def _mask(self, access: Access) -> bytes:
        out = bytearray(self.size)
        for register in self.registers():
            out[register.offset : register.end] = register.access_masks()[access].to_bytes(register.width, "little")
        return bytes(out)

    def write_mask(self) -> bytes:
        """Bits the client may change, per byte of :meth:`image`: the ``RW`` bits."""
        return self._mask(RW)

    def clear_mask(self) -> bytes:
        """Bits a client write of 1 clears, per byte: the ``RW1C`` bits."""
        return self._mask(RW1C)


@dataclass
class PowerManagement(Capability):
    """PCI Power Management (ID 0x01): D0..D3hot in PMCSR, no PME.

    ::

         31                24 23                16 15                 8 7                  0
        +--------------------------------------+--------------------+--------------------+
        | pmc (RO) = 0x0003: version 3         | next               | cap_id = 0x01      | +0x0
        +------------------+-------------------+--------------------+--------------------+
        | data (RO) = 0    | bridge_support    | pmcsr                                   | +0x4
        |                  | (RO) = 0          |                                         |
        +------------------+-------------------+-----------------------------------------+

        pmcsr: bits 1:0 power_state (RW: D0..D3hot), bit 3 no_soft_reset (RO, 1: the
        function keeps its state through D3hot -> D0), everything else RO 0.
    """

    cap_id = 0x01

    def body(self) -> tuple[Register, ...]:
        return (
            Register("pmc", 0x2, width=2, access=RO, reset=0x0003, fields=(Field("version", 0, 3, RO),)),
            Register(
                "pmcsr",
                0x4,
                width=2,
                access=RO,
                reset=0x0008,
                fields=(Field("power_state", 0, 2, RW), Field("no_soft_reset", 3, 1, RO)),
            ),
            Register("bridge_support", 0x6, width=1, access=RO),
            Register("data", 0x7, width=1, access=RO),
        )


@dataclass
class Msi(Capability):
    """MSI (ID 0x05) with ``vectors`` (a power of two up to 32), 64-bit, optional per-vector masking.

    ::

         31                                16 15                 8 7                  0
        +--------------------------------------+--------------------+--------------------+
        | message_control                      | next               | cap_id = 0x05      | +0x00
        +--------------------------------------+--------------------+--------------------+
        | message_address (RW, bits 1:0 RO 0)                                            | +0x04
        +--------------------------------------------------------------------------------+
        | message_upper_address (RW)                                                     | +0x08
        +--------------------------------------+-----------------------------------------+
        | reserved (RO 0)                      | message_data (RW)                       | +0x0C
        +--------------------------------------+-----------------------------------------+
        | mask_bits (RW, one bit per vector; only with per_vector_mask)                  | +0x10
        +--------------------------------------------------------------------------------+
        | pending_bits (RO to the client, set by the device; only with per_vector_mask)  | +0x14
        +--------------------------------------------------------------------------------+

        message_control:
          15    9 8                 7          6   4 3   1 0
        +--------+-----------------+----------+-----+-----+------+
        | RO 0   | per_vector_mask | address_ | MME | MMC | enable |
        |        | (RO)            | 64 (RO 1)| (RW)| (RO)| (RW)   |
        +--------+-----------------+----------+-----+-----+------+
        MMC: log2(vectors) the function asks for; MME: log2(vectors) the driver granted.
    """

    vectors: int = 1
    per_vector_mask: bool = False
    cap_id = 0x05

    def __post_init__(self) -> None:
        if self.vectors not in (1, 2, 4, 8, 16, 32):
            raise ValueError("MSI supports 1, 2, 4, 8, 16 or 32 vectors")

    @property
    def mmc(self) -> int:
        return self.vectors.bit_length() - 1

    def body(self) -> tuple[Register, ...]:
        control = Register(
            "message_control",
            0x2,
            width=2,
            access=RO,
            reset=(self.mmc << 1) | 1 << 7 | (1 << 8 if self.per_vector_mask else 0),
            fields=(
                Field("enable", 0, 1, RW),
                Field("multiple_message_capable", 1, 3, RO),
                Field("multiple_message_enable", 4, 3, RW),
                Field("address_64", 7, 1, RO),
                Field("per_vector_mask", 8, 1, RO),
            ),
        )
        registers: tuple[Register, ...] = (
            control,
            Register("message_address", 0x4, width=4, access=RO, fields=(Field("address", 2, 30, RW),)),
            Register("message_upper_address", 0x8, width=4, access=RW),
            Register("message_data", 0xC, width=2, access=RW),
            Register("reserved", 0xE, width=2, access=RO),
        )
        if self.per_vector_mask:
            registers += (
                Register("mask_bits", 0x10, width=4, access=RO, fields=(Field("mask", 0, self.vectors, RW),)),
                Register("pending_bits", 0x14, width=4, access=RO),
            )
        return registers


@dataclass
class MsiX(Capability):
    """MSI-X (ID 0x11): table and PBA live in BARs the device declares.

    The framework adds trapped areas for them to the named BARs.

    ::

         31                                16 15                 8 7                  0
        +--------------------------------------+--------------------+--------------------+
        | message_control                      | next               | cap_id = 0x11      | +0x0
        +--------------------------------------+--------------------+-----------+--------+
        | table: offset (RO, 8-byte aligned)                                    | BIR    | +0x4
        +-----------------------------------------------------------------------+--------+
        | pba: offset (RO, 8-byte aligned)                                      | BIR    | +0x8
        +-----------------------------------------------------------------------+--------+

        message_control:
          15        14              13   11 10                    0
        +--------+---------------+--------+-----------------------+
        | enable | function_mask | RO 0   | table_size (RO):       |
        | (RW)   | (RW)          |        | vectors - 1            |
        +--------+---------------+--------+-----------------------+
        BIR (bits 2:0, RO): which BAR holds the table or the PBA.
    """

    vectors: int = 1
    table_bar: int = 0
    table_offset: int = 0
    pba_bar: int = 0
    pba_offset: int = 0
    cap_id = 0x11

    def __post_init__(self) -> None:
        if not 1 <= self.vectors <= 2048:
            raise ValueError("MSI-X supports 1 to 2048 vectors")
        if self.table_offset % 8 or self.pba_offset % 8:
            raise ValueError("MSI-X table and PBA offsets must be 8-byte aligned")

    @property
    def table_size(self) -> int:
        return 16 * self.vectors

    @property
    def pba_size(self) -> int:
        return 8 * ((self.vectors + 63) // 64)

    def body(self) -> tuple[Register, ...]:
        locator = (Field("bir", 0, 3, RO), Field("offset", 3, 29, RO))
        return (
            Register(
                "message_control",
                0x2,
                width=2,
                access=RO,
                reset=self.vectors - 1,
                fields=(Field("table_size", 0, 11, RO), Field("function_mask", 14, 1, RW), Field("enable", 15, 1, RW)),
            ),
            Register("table", 0x4, width=4, access=RO, reset=self.table_offset | self.table_bar, fields=locator),
            Register("pba", 0x8, width=4, access=RO, reset=self.pba_offset | self.pba_bar, fields=locator),
        )


#: Device Capabilities' Max_Payload_Size Supported encoding, by payload size in bytes.
_MAX_PAYLOAD_CODES = {128: 0, 256: 1, 512: 2, 1024: 3, 2048: 4, 4096: 5}


@dataclass
class PciExpress(Capability):
    """PCI Express (ID 0x10), version 2, endpoint, 2.5 GT/s x1; ``flr`` advertises Function Level Reset.

    Writing Initiate-FLR (device_control bit 15) resets the function: the bit
    is a command, never stored, so it always reads back 0.  An endpoint has
    no slot or root port: those registers are declared read-only zero so the
    capability has the 0x3C bytes version 2 defines.

    ::

         31                                16 15                 8 7                  0
        +--------------------------------------+--------------------+--------------------+
        | pcie_capabilities (RO): 0x0002       | next               | cap_id = 0x10      | +0x00
        +--------------------------------------+--------------------+--------------------+
        | device_capabilities (RO): bit 28 flr, bits 2:0 max_payload_supported           | +0x04
        +--------------------------------------+-----------------------------------------+
        | device_status (RW1C bits 3:0)        | device_control                          | +0x08
        +--------------------------------------+-----------------------------------------+
        | link_capabilities (RO): 2.5 GT/s, x1                                           | +0x0C
        +--------------------------------------+-----------------------------------------+
        | link_status (RO): 2.5 GT/s, x1       | link_control                            | +0x10
        +--------------------------------------+-----------------------------------------+
        | slot_capabilities, slot_control, slot_status, root_control,                    | +0x14
        | root_capabilities, root_status, device_capabilities_2 (RO 0)                   |  ..0x27
        +--------------------------------------+-----------------------------------------+
        | device_status_2 (RO 0)               | device_control_2                        | +0x28
        +--------------------------------------+-----------------------------------------+
        | link_capabilities_2, link_control_2, link_status_2, slot_capabilities_2,       | +0x2C
        | slot_control_2, slot_status_2 (RO 0)                                           |  ..0x3B
        +--------------------------------------------------------------------------------+

        device_control (reset 0x2010: relaxed ordering, 512-byte read requests):
          15             14  12       11         10        9  8  7   5         4                3..0
        +--------------+-------------+----------+---------+------+-------------+--------------+------------+
        | initiate_flr | max_read_   | no_snoop | aux_    | RO 0 | max_payload | relaxed_     | error      |
        | (WO: resets) | request (RW)| (RW)     | power   |      | (RW)        | ordering (RW)| reporting  |
        |              |             |          | (RW)    |      |             |              | (RW)       |
        +--------------+-------------+----------+---------+------+-------------+--------------+------------+
        device_status: bits 3:0 correctable, non-fatal, fatal, unsupported request detected (RW1C).
        link_control: bits 1:0 aspm_control, 6 common_clock, 7 extended_synch, 8 clock_pm (RW).
        device_control_2: bits 3:0 completion_timeout_value, 4 completion_timeout_disable (RW).
    """

    flr: bool = True
    max_payload: int = 128
    cap_id = 0x10

    def body(self) -> tuple[Register, ...]:
        devcap = _MAX_PAYLOAD_CODES[self.max_payload] | (1 << 28 if self.flr else 0)
        device_control = (
            Field("error_reporting", 0, 4, RW),
            Field("relaxed_ordering", 4, 1, RW),
            Field("max_payload", 5, 3, RW),
            Field("aux_power", 10, 1, RW),
            Field("no_snoop", 11, 1, RW),
            Field("max_read_request", 12, 3, RW),
            Field("initiate_flr", 15, 1, WO if self.flr else RO),
        )
        return (
            Register("pcie_capabilities", 0x02, width=2, access=RO, reset=0x0002),
            Register(
                "device_capabilities",
                0x04,
                width=4,
                access=RO,
                reset=devcap,
                fields=(Field("max_payload_supported", 0, 3, RO), Field("flr", 28, 1, RO)),
            ),
            Register("device_control", 0x08, width=2, access=RO, reset=0x2010, fields=device_control),
            Register("device_status", 0x0A, width=2, access=RO, fields=(Field("errors_detected", 0, 4, RW1C),)),
            Register("link_capabilities", 0x0C, width=4, access=RO, reset=0x00000011),
            Register(
                "link_control",
                0x10,
                width=2,
                access=RO,
                fields=(
                    Field("aspm_control", 0, 2, RW),
                    Field("common_clock", 6, 1, RW),
                    Field("extended_synch", 7, 1, RW),
                    Field("clock_pm", 8, 1, RW),
                ),
            ),
            Register("link_status", 0x12, width=2, access=RO, reset=0x0011),
            Register("slot_capabilities", 0x14, width=4, access=RO),
            Register("slot_control", 0x18, width=2, access=RO),
            Register("slot_status", 0x1A, width=2, access=RO),
            Register("root_control", 0x1C, width=2, access=RO),
            Register("root_capabilities", 0x1E, width=2, access=RO),
            Register("root_status", 0x20, width=4, access=RO),
            Register("device_capabilities_2", 0x24, width=4, access=RO),
            Register(
                "device_control_2",
                0x28,
                width=2,
                access=RO,
                fields=(Field("completion_timeout_value", 0, 4, RW), Field("completion_timeout_disable", 4, 1, RW)),
            ),
            Register("device_status_2", 0x2A, width=2, access=RO),
            Register("link_capabilities_2", 0x2C, width=4, access=RO),
            Register("link_control_2", 0x30, width=2, access=RO),
            Register("link_status_2", 0x32, width=2, access=RO),
            Register("slot_capabilities_2", 0x34, width=4, access=RO),
            Register("slot_control_2", 0x38, width=2, access=RO),
            Register("slot_status_2", 0x3A, width=2, access=RO),
        )


@dataclass
class VendorSpecific(Capability):
    """Vendor-specific capability (ID 0x09) carrying ``data`` (read-only).

    ::

         31            24 23                16 15                 8 7                  0
        +----------------+--------------------+--------------------+--------------------+
        | data[0]        | length = 3 + data  | next               | cap_id = 0x09      | +0x0
        +----------------+--------------------+--------------------+--------------------+
        | data[1:] ... (RO)                                                             | +0x4
        +-------------------------------------------------------------------------------+
    """

    data: bytes = b""
    cap_id = 0x09

    def body(self) -> tuple[Register, ...]:
        return (Register("length", 0x2, width=1, access=RO, reset=3 + len(self.data)),)

    def trailer(self) -> bytes:
        return self.data


@dataclass
class RawCapability(Capability):
    """An escape hatch: any capability ID with the caller's bytes and per-byte write mask.

    ``data`` excludes the two header bytes (ID and next pointer);
    ``writable`` is the write mask of ``data``'s bytes (missing bytes: read-only).
    Nothing else is declared, so nothing can look its registers up by name.
    """

    cap_id: int = 0
    data: bytes = b""
    writable: bytes = field(default=b"")

    def trailer(self) -> bytes:
        return self.data

    def write_mask(self) -> bytes:
        return bytes(2) + self.writable.ljust(len(self.data), b"\0")


class ExtendedCapability(Capability):
    """An extended capability (offset >= 0x100, 16-bit ID, 4-bit version).

    Its header is one dword — ID (bits 15:0), version (19:16), next offset
    (31:20) — which the layout fills in.
    """

    extended = True
    version = 1

    def header(self) -> tuple[Register, ...]:
        return (
            Register(
                "header",
                0x0,
                width=4,
                access=RO,
                fields=(Field("cap_id", 0, 16, RO), Field("version", 16, 4, RO), Field("next", 20, 12, RO)),
            ),
        )


@dataclass
class DeviceSerialNumber(ExtendedCapability):
    """Device Serial Number (extended ID 0x0003): a read-only 64-bit serial.

    ::

         31                    20 19      16 15                                          0
        +------------------------+----------+---------------------------------------------+
        | next                   | version 1| cap_id = 0x0003                             | +0x0
        +------------------------+----------+---------------------------------------------+
        | serial (RO), lower dword                                                        | +0x4
        +---------------------------------------------------------------------------------+
        | serial (RO), upper dword                                                        | +0x8
        +---------------------------------------------------------------------------------+
    """

    serial: int = 0
    cap_id = 0x0003

    def body(self) -> tuple[Register, ...]:
        return (Register("serial", 0x4, width=8, access=RO, reset=self.serial),)


@dataclass
class VendorSpecificExtended(ExtendedCapability):
    """Vendor-specific extended capability (ID 0x000B) with a VSEC ID, revision and data.

    ::

         31                    20 19      16 15                                          0
        +------------------------+----------+---------------------------------------------+
        | next                   | version 1| cap_id = 0x000B                             | +0x0
        +------------------------+----------+---------------------------------------------+
        | length = 8 + data      | vsec_rev | vsec_id                                     | +0x4
        +------------------------+----------+---------------------------------------------+
        |                 (together: vendor_header, RO)                                   |
        +------------------------+----------+---------------------------------------------+
        | data ... (RO)                                                                   | +0x8
        +---------------------------------------------------------------------------------+
    """

    vsec_id: int = 0
    vsec_rev: int = 0
    data: bytes = b""
    cap_id = 0x000B

    def body(self) -> tuple[Register, ...]:
        header = self.vsec_id | (self.vsec_rev << 16) | ((8 + len(self.data)) << 20)
        fields = (Field("vsec_id", 0, 16, RO), Field("vsec_rev", 16, 4, RO), Field("length", 20, 12, RO))
        return (Register("vendor_header", 0x4, width=4, access=RO, reset=header, fields=fields),)

    def trailer(self) -> bytes:
        return self.data
