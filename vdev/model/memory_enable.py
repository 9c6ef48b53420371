"""Memory and I/O enable (COMMAND.MEM / COMMAND.IO) as something Python watches and drives.

Policies say what a BAR does while its decoding is off:

* :class:`DisabledAccess` — trapped accesses: ``pass`` them to the handler,
  ``master-abort`` (reads return all-ones, writes are dropped, each one is
  recorded as a violation — what a real bus does), or ``error`` (the access
  gets an error reply).
* :class:`DisabledMapping` — mapped areas: ``keep`` them valid (what QEMU
  expects), ``revoke`` them so direct mappings raise SIGBUS (like vfio-pci;
  contents come back on enable), or ``discard`` the contents.
* :class:`Prefault` — on enable: ``lazy`` (pages return on first touch) or
  ``populate`` (every page resident before the enabling write is answered).

:class:`CommandControl` is the device side: force a bit on or off (the
client reads back the forced value), hold a bit against the client's
writes, and schedules that toggle MEM by time, by access count, or at random
with a seed.  Every transition, whoever caused it, goes through the device's
single command-change path, so the event log has them all, in order.
"""

from __future__ import annotations

import enum
import random
from typing import TYPE_CHECKING

import trio

from vdev.model.pci_regs import PCI_COMMAND, PCI_COMMAND_IO, PCI_COMMAND_MEMORY

if TYPE_CHECKING:
    from vdev.model.device import Device


class DisabledAccess(enum.Enum):
    """What a trapped access does while the BAR's decoding is off."""

    PASS = "pass"
    MASTER_ABORT = "master-abort"
    ERROR = "error"


class DisabledMapping(enum.Enum):
    """What the BAR's mapped areas do while its decoding is off."""

    KEEP = "keep"
    REVOKE = "revoke"
    DISCARD = "discard"


class Prefault(enum.Enum):
    """How mapped pages come back when decoding is turned on."""

    LAZY = "lazy"
    POPULATE = "populate"


class BarDisabledError(Exception):
    """A trapped access to a BAR whose decoding is off, under the ``error`` policy."""


def _bits(memory: bool | None, io: bool | None) -> tuple[int, int]:
    """(mask, value) of the COMMAND bits named."""
    mask = value = 0
    if memory is not None:
        mask |= PCI_COMMAND_MEMORY
        value |= PCI_COMMAND_MEMORY if memory else 0
    if io is not None:
        mask |= PCI_COMMAND_IO
        value |= PCI_COMMAND_IO if io else 0
    return mask, value


class CommandControl:
    """Device-side control of COMMAND's MEM and IO bits."""

    def __init__(self, device: Device) -> None:
        self._device = device
        self.held_mask = 0
        self.held_value = 0
        self.accesses = 0
        #: (every, at) while MEM toggles every ``every`` accesses, next when :attr:`accesses` reaches ``at``.
        self.access_schedule: tuple[int, int] | None = None

    def force(self, *, memory: bool | None = None, io: bool | None = None) -> None:
        """Set MEM and/or IO as if the device changed them; the client reads the new value back."""
        mask, value = _bits(memory, io)
        old = self._device.command
        new_value = (old.value & ~mask) | value
        if new_value != old.value:
            self._device.config.write_int(PCI_COMMAND, 2, new_value)
            self._device.command_changed(old, source="device")

    def hold(self, *, memory: bool | None = None, io: bool | None = None) -> None:
        """Pin MEM and/or IO at the given values: the client's writes to them are ignored."""
        mask, value = _bits(memory, io)
        self.force(memory=memory, io=io)
        self.held_mask |= mask
        self.held_value = (self.held_value & ~mask) | value

    def release(self) -> None:
        """Stop holding any bit."""
        self.held_mask = self.held_value = 0

    def apply_holds(self, written: int) -> int:
        """The COMMAND value a client write leaves, with held bits kept."""
        return (written & ~self.held_mask) | (self.held_value & self.held_mask)

    def toggle_memory(self) -> None:
        self.force(memory=not self._device.command.memory)

    async def toggle_every(self, period: float, *, count: int | None = None) -> None:
        """Flip MEM every ``period`` seconds (``count`` times, or until cancelled)."""
        done = 0
        while count is None or done < count:
            await trio.sleep(period)
            self.toggle_memory()
            done += 1

    async def toggle_randomly(self, mean_period: float, *, seed: int, count: int | None = None) -> None:
        """Flip MEM at exponentially distributed intervals, reproducibly from ``seed``."""
        rng = random.Random(seed)
        done = 0
        while count is None or done < count:
            await trio.sleep(rng.expovariate(1 / mean_period))
            self.toggle_memory()
            done += 1

    def toggle_after_accesses(self, every: int) -> None:
        """Flip MEM after every ``every`` trapped BAR accesses (0 stops it)."""
        self.access_schedule = (every, self.accesses + every) if every > 0 else None

    def count_access(self) -> None:
        """Called by the device for every trapped BAR access."""
        self.accesses += 1
        if self.access_schedule is not None and self.accesses >= self.access_schedule[1]:
            every = self.access_schedule[0]
            self.access_schedule = (every, self.accesses + every)
            self.toggle_memory()
