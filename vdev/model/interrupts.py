"""Interrupts as device code sees them: INTx levels, MSI and MSI-X vectors, ERR and REQ.

Device code calls :meth:`Interrupts.trigger`, :meth:`Interrupts.raise_intx`
and friends from any Trio task; they never block.  This module decides
*whether* an interrupt may be delivered (enable bits, INTx-disable, MSI and
MSI-X masking with pending bits) and hands deliverable ones to the runtime's
:class:`IrqSink`, which owns the eventfds.

MSI-X masking belongs to the client.  A vfio-user client such as QEMU
emulates the MSI-X table and PBA itself: the guest's writes to the table
never reach the device, and the client masks a vector either by telling the
server (SET_IRQS MASK/UNMASK) or by not installing an eventfd for it (QEMU
installs one when the guest unmasks the vector).  So a vector is *held*
pending while the client masked it with SET_IRQS, while it has no eventfd,
or while the function mask (MSI-X control, in config space, which clients
forward) is set; it fires when that ends: on UNMASK, on the SET_IRQS that
installs its eventfd, on clearing the function mask.  The table in the BAR
is the device's copy of memory the client virtualises: it resets to masked
entries, keeps what a client that does not virtualise it writes (vdev's own
client, ``vdev inspect``), and never gates delivery.  The PBA reads as the
vectors held here; QEMU shows the guest the device's PBA until it holds a
vector itself.

MSI per-vector masks live in config space (the client forwards them) and
work as the PCI spec says, with the capability's pending register.  INTx is
a level: while it is high and the client unmasks INTx, it fires again.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Protocol

from vdev.model.capabilities import Msi, MsiX
from vdev.model.events import FaultInjected, Irq
from vdev.model.pci_regs import PCI_STATUS, PCI_STATUS_INTERRUPT
from vdev.model.registers import Field, Register
from vdev.protocol.constants import IrqIndex

if TYPE_CHECKING:
    from vdev.model.device import Device

MSIX_ENTRY_SIZE = 16
MSIX_VECTOR_CTRL_MASKBIT = 0x1


class IrqSink(Protocol):
    """Where deliverable interrupts go: the runtime's libvfio-user context.

    When the client turns out to have no eventfd for an MSI-X vector the
    sink calls :meth:`Interrupts.no_eventfd`; when the client may have
    installed eventfds it calls :meth:`Interrupts.eventfds_changed`.
    """

    def fire(self, irq_type: IrqIndex, vector: int) -> None:
        """Signal the client's eventfd for ``vector`` (as soon as the context is free)."""
        ...


class Interrupts:
    """One device's interrupt state."""

    def __init__(self, device: Device) -> None:
        self._device = device
        self.sink: IrqSink | None = None
        self.intx_level = False
        self._client_masked: dict[IrqIndex, set[int]] = {t: set() for t in IrqIndex}
        self._msix = device.config.find(MsiX)
        self._msi = device.config.find(Msi)
        # The capability registers the rules read, looked up once by name.
        self._msix_control = self._msix.register("message_control") if self._msix else None
        self._msi_control = self._msi.register("message_control") if self._msi else None
        self._msi_mask_bits = self._msi_pending_bits = None
        if self._msi is not None and self._msi_cap is not None and self._msi_cap.per_vector_mask:
            self._msi_mask_bits = self._msi.register("mask_bits")
            self._msi_pending_bits = self._msi.register("pending_bits")
        self.msix_table = bytearray(self._msix_cap.table_size) if self._msix_cap else bytearray()
        #: MSI-X vectors held pending (what the PBA reads as).
        self.msix_pending: set[int] = set()
        # MSI-X vectors the client has, as far as we know, no eventfd for:
        # all of them until a client sends SET_IRQS.
        self._without_eventfd: set[int] = set()
        self.reset()
        self.client_gone()

    @property
    def _msix_cap(self) -> MsiX | None:
        return self._msix.capability if self._msix else None  # type: ignore[return-value]

    @property
    def _msi_cap(self) -> Msi | None:
        return self._msi.capability if self._msi else None  # type: ignore[return-value]

    def reset(self) -> None:
        """Power-on state: INTx low, every MSI-X table entry masked, nothing pending.

        What the client set up (its masks, its eventfds) is the client's and
        survives a device reset.
        """
        self.intx_level = False
        self.msix_pending.clear()
        cap = self._msix_cap
        if cap is not None:
            for vector in range(cap.vectors):
                struct.pack_into("<QII", self.msix_table, vector * MSIX_ENTRY_SIZE, 0, 0, MSIX_VECTOR_CTRL_MASKBIT)

    def vector_counts(self) -> dict[IrqIndex, int]:
        """How many vectors of each type the device has: what GET_IRQ_INFO reports (0: none)."""
        counts = dict.fromkeys(IrqIndex, 0)
        counts.update({IrqIndex.INTX: 1 if self._device.intx else 0, IrqIndex.ERR: 1, IrqIndex.REQ: 1})
        if self._msi_cap is not None:
            counts[IrqIndex.MSI] = self._msi_cap.vectors
        if self._msix_cap is not None:
            counts[IrqIndex.MSIX] = self._msix_cap.vectors
        return counts

    # -- which mode is on ----------------------------------------------------

    @property
    def msix_enabled(self) -> bool:
        return self._msix_control is not None and bool(self._control_field(self._msix_control, "enable"))

    @property
    def msi_enabled(self) -> bool:
        return self._msi_control is not None and bool(self._control_field(self._msi_control, "enable"))

    def _control_field(self, control: Register, name: str) -> int:
        field: Field = control.field(name)
        return field.extract(self._device.config.read_register(control))

    @property
    def mode(self) -> str:
        """``msix``, ``msi`` or ``intx``: what :meth:`trigger` uses now."""
        if self.msix_enabled:
            return "msix"
        if self.msi_enabled:
            return "msi"
        return "intx"

    # -- device-facing API ---------------------------------------------------

    def trigger(self, vector: int = 0) -> None:
        """Signal ``vector`` through MSI-X or MSI, or pulse INTx if neither is enabled."""
        mode = self.mode
        if mode == "msix":
            self._trigger_msix(vector)
        elif mode == "msi":
            self._trigger_msi(vector)
        else:
            self.raise_intx()

    def raise_intx(self) -> None:
        """Assert INTx (level): the status bit sets and the client is signalled."""
        self.intx_level = True
        self._set_status_interrupt(True)
        self._deliver_intx()

    def lower_intx(self) -> None:
        """De-assert INTx."""
        self.intx_level = False
        self._set_status_interrupt(False)

    def report_error(self) -> None:
        """Signal ERR: the device hit an unrecoverable error (QEMU reports it and stops the VM)."""
        self._fire(IrqIndex.ERR, 0)

    def request_release(self) -> None:
        """Signal REQ: ask the client to release the device (QEMU 11.1's vfio-user-pci sets no REQ eventfd)."""
        self._fire(IrqIndex.REQ, 0)

    # -- rules ----------------------------------------------------------------

    def _fire(self, irq_type: IrqIndex, vector: int) -> None:
        times = 1
        fault = self._device.faults.pick("irq", vector=vector)
        if fault is not None:
            self._device.events.record(FaultInjected(fault=fault, at={"type": irq_type.name.lower(), "vector": vector}))
            times = {"drop": 0, "duplicate": 2, "storm": fault.times}[fault.action]
        for _ in range(times):
            connected = self.sink is not None
            self._device.events.record(Irq(type=irq_type.name.lower(), vector=vector, connected=connected))
            if self.sink is not None:
                self.sink.fire(irq_type, vector)

    def _set_status_interrupt(self, level: bool) -> None:
        status = self._device.config.read_int(PCI_STATUS, 2)
        status = status | PCI_STATUS_INTERRUPT if level else status & ~PCI_STATUS_INTERRUPT
        self._device.config.write_int(PCI_STATUS, 2, status)

    def _deliver_intx(self) -> None:
        if self._device.command.intx_disable or 0 in self._client_masked[IrqIndex.INTX]:
            return
        self._fire(IrqIndex.INTX, 0)

    def _trigger_msi(self, vector: int) -> None:
        cap = self._msi_cap
        assert cap is not None and self._msi_control is not None
        enabled_vectors = 1 << self._control_field(self._msi_control, "multiple_message_enable")
        if vector >= min(enabled_vectors, cap.vectors):
            raise ValueError(f"MSI vector {vector} is not enabled ({enabled_vectors} allocated)")
        if cap.per_vector_mask and self._msi_vector_masked(vector):
            self._msi_set_pending(vector, True)
            return
        self._fire(IrqIndex.MSI, vector)

    def _msi_vector_masked(self, vector: int) -> bool:
        assert self._msi_mask_bits is not None
        mask = self._device.config.read_register(self._msi_mask_bits)
        return bool(mask >> vector & 1) or vector in self._client_masked[IrqIndex.MSI]

    def _msi_set_pending(self, vector: int, pending: bool) -> None:
        assert self._msi_pending_bits is not None
        bits = self._device.config.read_register(self._msi_pending_bits)
        bits = bits | (1 << vector) if pending else bits & ~(1 << vector)
        self._device.config.write_register(self._msi_pending_bits, bits)

    def _trigger_msix(self, vector: int) -> None:
        cap = self._msix_cap
        assert cap is not None
        if not 0 <= vector < cap.vectors:
            raise ValueError(f"MSI-X vector {vector} out of range (0..{cap.vectors - 1})")
        if self._msix_vector_held(vector):
            self._hold(vector, "masked" if vector not in self._without_eventfd else "no eventfd")
            return
        self._fire(IrqIndex.MSIX, vector)

    def _msix_vector_held(self, vector: int) -> bool:
        """Whether the client masked ``vector`` (function mask, SET_IRQS, or no eventfd)."""
        assert self._msix_control is not None
        if self._control_field(self._msix_control, "function_mask"):
            return True
        return vector in self._client_masked[IrqIndex.MSIX] or vector in self._without_eventfd

    def _hold(self, vector: int, why: str) -> None:
        self.msix_pending.add(vector)
        self._device.events.record(Irq(type="msix", vector=vector, held=why))

    def no_eventfd(self, irq_type: IrqIndex, vector: int) -> None:
        """The client has no eventfd for ``vector``: an MSI-X vector waits, pending, for one.

        For INTx and MSI, which have no pending bit the client could see,
        the signal is simply lost, as it is on a client that wired nothing.
        """
        if irq_type is IrqIndex.MSIX:
            self._without_eventfd.add(vector)
            self._hold(vector, "no eventfd")

    @property
    def awaiting_eventfds(self) -> bool:
        """Whether some MSI-X vector is known to lack an eventfd (so SET_IRQS matters)."""
        return bool(self._without_eventfd)

    def eventfds_changed(self) -> None:
        """The client sent SET_IRQS: it may have installed eventfds, so try the held vectors again."""
        self._without_eventfd.clear()
        self.deliver_unmasked_pending()

    def client_gone(self) -> None:
        """No client (yet, or any more): no eventfds and no client masks."""
        for masked in self._client_masked.values():
            masked.clear()
        cap = self._msix_cap
        self._without_eventfd = set(range(cap.vectors)) if cap is not None else set()

    def deliver_unmasked_pending(self) -> None:
        """Fire every pending MSI-X and MSI vector that is no longer masked (after any unmask)."""
        if self.msix_enabled:
            for vector in sorted(self.msix_pending):
                if not self._msix_vector_held(vector):
                    self.msix_pending.discard(vector)
                    self._fire(IrqIndex.MSIX, vector)
        if self.msi_enabled and self._msi_pending_bits is not None:
            pending = self._device.config.read_register(self._msi_pending_bits)
            for vector in range(32):
                if pending >> vector & 1 and not self._msi_vector_masked(vector):
                    self._msi_set_pending(vector, False)
                    self._fire(IrqIndex.MSI, vector)

    def intx_unmasked(self) -> None:
        """The client unmasked INTx (SET_IRQS, or INTx-disable cleared): a level still high fires again.

        Only an unmask does: INTx has no pending bit, and any other config
        write or SET_IRQS while the level is high must not signal it anew.
        """
        if self.intx_level and self.mode == "intx":
            self._deliver_intx()

    def client_mask(self, irq_type: IrqIndex, start: int, count: int, masked: bool) -> None:
        """The client masked or unmasked vectors with SET_IRQS."""
        vectors = set(range(start, start + count))
        if masked:
            self._client_masked[irq_type] |= vectors
        else:
            self._client_masked[irq_type] -= vectors
            if irq_type is IrqIndex.INTX:
                self.intx_unmasked()
            else:
                self.deliver_unmasked_pending()

    # -- the MSI-X table and PBA as a trapped area -----------------------------

    def read_msix_table(self, offset: int, size: int) -> bytes:
        return bytes(self.msix_table[offset : offset + size]).ljust(size, b"\0")

    def write_msix_table(self, offset: int, data: bytes) -> None:
        """Keep what the client wrote; masking is the client's (see the module docstring)."""
        end = min(offset + len(data), len(self.msix_table))
        self.msix_table[offset:end] = data[: end - offset]

    def read_msix_pba(self, offset: int, size: int) -> bytes:
        bits = sum(1 << vector for vector in self.msix_pending)
        cap = self._msix_cap
        assert cap is not None
        pba = bits.to_bytes(cap.pba_size, "little")
        return pba[offset : offset + size].ljust(size, b"\0")
