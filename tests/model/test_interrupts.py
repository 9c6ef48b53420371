"""Every rule of vdev/model/interrupts.py, on the bench: what fires, what is held, what the PBA and pending bits say.

The bench's recording sink stands for the client's eventfds and its
SET_IRQS masks (see the module docstring of vdev.model.interrupts: MSI-X
masking is the client's), so each test states what the client did and
checks which vectors of which type reached it, in order.
"""

from __future__ import annotations

import pytest

from vdev import WO, Bar, Device, Msi, MsiX, Register
from vdev.model.capabilities import PCI_MSIX_FLAGS_ENABLE, PCI_MSIX_FLAGS_MASKALL
from vdev.model.events import Irq
from vdev.model.pci_regs import PCI_COMMAND, PCI_COMMAND_INTX_DISABLE, PCI_STATUS, PCI_STATUS_INTERRUPT
from vdev.protocol.constants import IrqIndex
from vdev.testing import Bench, Fired, OpenBench

INTX, MSI, MSIX = IrqIndex.INTX, IrqIndex.MSI, IrqIndex.MSIX
TABLE, PBA = 0x800, 0xC00


class Vectors(Device):
    """INTx, MSI (4 vectors, per-vector masking) and MSI-X (4 vectors, table and PBA in BAR0)."""

    vendor_id = 0x1B36
    device_id = 0x7E57
    bar0 = Bar(4096, registers=[Register("doorbell", 0x0, access=WO)])

    def capabilities(self) -> list[Msi | MsiX]:
        return [
            Msi(vectors=4, per_vector_mask=True),
            MsiX(vectors=4, table_bar=0, table_offset=TABLE, pba_bar=0, pba_offset=PBA),
        ]

    @bar0.on_write("doorbell")
    def ring(self, vector: int) -> None:
        self.irq.trigger(vector)


def capability_at(bench: Bench, kind: type[Msi] | type[MsiX]) -> int:
    placed = bench.device.config.find(kind)
    assert placed is not None
    return placed.offset


async def ring(bench: Bench, *vectors: int) -> None:
    for vector in vectors:
        await bench.write(0, "doorbell", vector)


async def pba(bench: Bench) -> int:
    return await bench.read(0, PBA, 8)


async def msix_bench(vdev_bench: OpenBench, *, function_masked: bool = False) -> Bench:
    bench = await vdev_bench(Vectors())
    await bench.enable(memory=True, io=False, master=True)
    await bench.enable_msix(function_masked=function_masked)
    return bench


# -- MSI-X ----------------------------------------------------------------------------


async def test_msix_delivers_each_vector_in_the_order_triggered(vdev_bench: OpenBench) -> None:
    bench = await msix_bench(vdev_bench)
    assert bench.device.irq.mode == "msix"
    await ring(bench, 0, 2, 1, 2)
    assert bench.irqs.take() == [Fired(MSIX, 0), Fired(MSIX, 2), Fired(MSIX, 1), Fired(MSIX, 2)]
    assert await pba(bench) == 0


async def test_a_vector_the_client_masks_with_set_irqs_is_pending_in_the_pba_and_fires_once_on_unmask(
    vdev_bench: OpenBench,
) -> None:
    bench = await msix_bench(vdev_bench)
    bench.mask_irqs(MSIX, 1)
    await ring(bench, 1, 0, 1)
    assert bench.irqs.take() == [Fired(MSIX, 0)]
    assert await pba(bench) == 0b0010
    assert bench.device.irq.msix_pending == {1}
    bench.unmask_irqs(MSIX, 1)
    assert bench.irqs.take() == [Fired(MSIX, 1)]  # two signals while masked: one pending bit, one message
    assert await pba(bench) == 0
    await ring(bench, 1)
    assert bench.irqs.take() == [Fired(MSIX, 1)]


async def test_unmasking_a_vector_that_is_not_pending_sends_nothing(vdev_bench: OpenBench) -> None:
    bench = await msix_bench(vdev_bench)
    bench.mask_irqs(MSIX, 0, 4)
    await ring(bench, 3)
    bench.unmask_irqs(MSIX, 0, 2)
    assert bench.irqs.take() == []
    assert await pba(bench) == 0b1000
    bench.unmask_irqs(MSIX, 2, 2)
    assert bench.irqs.take() == [Fired(MSIX, 3)]


async def test_the_function_mask_holds_every_vector_and_clearing_it_delivers_them_in_vector_order(
    vdev_bench: OpenBench,
) -> None:
    bench = await msix_bench(vdev_bench, function_masked=True)
    await ring(bench, 3, 0)
    assert bench.irqs.take() == []
    assert await pba(bench) == 0b1001
    control_at = capability_at(bench, MsiX) + 2
    await bench.config_write(control_at, PCI_MSIX_FLAGS_ENABLE, 2)  # the client clears the function mask
    assert bench.irqs.take() == [Fired(MSIX, 0), Fired(MSIX, 3)]
    assert await pba(bench) == 0


async def test_a_vector_stays_held_while_either_mask_is_set(vdev_bench: OpenBench) -> None:
    bench = await msix_bench(vdev_bench, function_masked=True)
    bench.mask_irqs(MSIX, 2)
    await ring(bench, 2)
    await bench.enable_msix(function_masked=False)
    assert bench.irqs.take() == []
    assert await pba(bench) == 0b0100
    bench.unmask_irqs(MSIX, 2)
    assert bench.irqs.take() == [Fired(MSIX, 2)]


async def test_a_vector_without_an_eventfd_waits_pending_until_the_client_installs_one(
    vdev_bench: OpenBench,
) -> None:
    bench = await vdev_bench(Vectors(), wired=False)
    await bench.enable(memory=True, io=False, master=True)
    await bench.enable_msix()
    await ring(bench, 2)
    assert bench.irqs.take() == []
    assert await pba(bench) == 0b0100
    held = [e for e in bench.device.events.of_kind(Irq) if e.held is not None]
    assert held == [Irq(type="msix", vector=2, held="no eventfd")]
    bench.set_irqs(MSIX, 0, 4)  # what QEMU does when the guest unmasks the vector
    assert bench.irqs.take() == [Fired(MSIX, 2)]
    assert await pba(bench) == 0


async def test_the_table_is_the_clients_memory_and_never_gates_delivery(vdev_bench: OpenBench) -> None:
    bench = await msix_bench(vdev_bench)
    for vector in range(4):
        assert await bench.read(0, TABLE + 16 * vector + 12, 4) == 1  # reset: every entry masked
    await bench.write(0, TABLE + 16, 0xFEE0_0000, 8)
    await bench.write(0, TABLE + 16 + 8, 0x4041, 4)
    await bench.write(0, TABLE + 16 + 12, 0, 4)
    assert await bench.read(0, TABLE + 16, 16) == 0x0000_0000_0000_4041_0000_0000_FEE0_0000
    await ring(bench, 0, 1)
    assert bench.irqs.take() == [Fired(MSIX, 0), Fired(MSIX, 1)]  # entry 0 is still masked in the table
    await bench.write(0, PBA, 0xF, 8)
    assert await pba(bench) == 0  # the PBA is read-only


async def test_a_vector_beyond_the_table_is_a_device_bug(vdev_bench: OpenBench) -> None:
    bench = await msix_bench(vdev_bench)
    with pytest.raises(ValueError, match="MSI-X vector 4 out of range"):
        bench.device.irq.trigger(4)


async def test_a_device_reset_forgets_pending_vectors_and_keeps_the_clients_masks(vdev_bench: OpenBench) -> None:
    bench = await msix_bench(vdev_bench)
    bench.mask_irqs(MSIX, 1)
    await bench.write(0, TABLE + 12, 0, 4)
    await ring(bench, 1)
    await bench.reset()
    assert bench.device.irq.msix_pending == set()
    assert bench.device.irq.mode == "intx"  # config space is back to power-on: MSI-X off
    await bench.enable(memory=True, io=False, master=True)
    await bench.enable_msix()
    assert await pba(bench) == 0
    assert await bench.read(0, TABLE + 12, 4) == 1  # the table too
    await ring(bench, 1)
    assert bench.irqs.take() == []  # the client's SET_IRQS mask outlived the reset
    bench.unmask_irqs(MSIX, 1)
    assert bench.irqs.take() == [Fired(MSIX, 1)]


async def test_a_new_client_starts_without_the_old_clients_masks(vdev_bench: OpenBench) -> None:
    device = Vectors()
    first = await vdev_bench(device)
    await first.enable(memory=True, io=False, master=True)
    await first.enable_msix()
    first.mask_irqs(MSIX, 0, 4)
    device.detach_client()  # the first client goes away, as at a disconnect
    second = await vdev_bench(device)
    await ring(second, 3)
    assert second.irqs.take() == [Fired(MSIX, 3)]
    assert first.irqs.take() == []


# -- MSI ----------------------------------------------------------------------------------


async def msi_bench(vdev_bench: OpenBench, vectors: int = 4) -> Bench:
    bench = await vdev_bench(Vectors())
    await bench.enable(memory=True, io=False, master=True)
    await bench.enable_msi(vectors)
    return bench


async def test_msi_delivers_the_vectors_the_driver_allocated_and_refuses_others(vdev_bench: OpenBench) -> None:
    bench = await msi_bench(vdev_bench, vectors=2)
    assert bench.device.irq.mode == "msi"
    await ring(bench, 1, 0)
    assert bench.irqs.take() == [Fired(MSI, 1), Fired(MSI, 0)]
    with pytest.raises(ValueError, match="MSI vector 2 is not enabled"):
        bench.device.irq.trigger(2)


async def test_a_masked_msi_vector_sets_its_pending_bit_and_fires_when_the_client_unmasks_it(
    vdev_bench: OpenBench,
) -> None:
    bench = await msi_bench(vdev_bench)
    mask_at = capability_at(bench, Msi) + 16
    pending_at = mask_at + 4
    await bench.config_write(mask_at, 0b0100)
    await ring(bench, 2, 1, 2)
    assert bench.irqs.take() == [Fired(MSI, 1)]
    assert await bench.config_read(pending_at) == 0b0100
    await bench.config_write(pending_at, 0)  # pending bits are the device's: read-only to the client
    assert await bench.config_read(pending_at) == 0b0100
    await bench.config_write(mask_at, 0)
    assert bench.irqs.take() == [Fired(MSI, 2)]
    assert await bench.config_read(pending_at) == 0


async def test_an_msi_vector_masked_with_set_irqs_is_held_the_same_way(vdev_bench: OpenBench) -> None:
    bench = await msi_bench(vdev_bench)
    pending_at = capability_at(bench, Msi) + 20
    bench.mask_irqs(MSI, 3)
    await ring(bench, 3)
    assert bench.irqs.take() == []
    assert await bench.config_read(pending_at) == 0b1000
    bench.unmask_irqs(MSI, 3)
    assert bench.irqs.take() == [Fired(MSI, 3)]
    assert await bench.config_read(pending_at) == 0


# -- INTx ---------------------------------------------------------------------------------


async def status_interrupt(bench: Bench) -> bool:
    return bool(await bench.config_read(PCI_STATUS, 2) & PCI_STATUS_INTERRUPT)


async def intx_bench(vdev_bench: OpenBench) -> Bench:
    bench = await vdev_bench(Vectors())
    await bench.enable(memory=True, io=False, master=False)
    assert bench.device.irq.mode == "intx"
    return bench


async def test_intx_is_a_level_that_status_reports(vdev_bench: OpenBench) -> None:
    bench = await intx_bench(vdev_bench)
    bench.device.irq.raise_intx()
    assert bench.irqs.take() == [Fired(INTX, 0)]
    assert await status_interrupt(bench)
    bench.device.irq.lower_intx()
    assert not await status_interrupt(bench)
    assert bench.irqs.take() == []


async def test_intx_disable_holds_a_high_level_until_it_is_cleared(vdev_bench: OpenBench) -> None:
    bench = await intx_bench(vdev_bench)
    command = await bench.config_read(PCI_COMMAND, 2)
    await bench.config_write(PCI_COMMAND, command | PCI_COMMAND_INTX_DISABLE, 2)
    bench.device.irq.raise_intx()
    assert bench.irqs.take() == []
    assert await status_interrupt(bench)  # the status bit shows the level even while it is disabled
    await bench.config_write(PCI_COMMAND, command, 2)
    assert bench.irqs.take() == [Fired(INTX, 0)]  # still high when re-enabled: it fires


async def test_other_config_writes_and_set_irqs_while_the_level_is_high_do_not_signal_again(
    vdev_bench: OpenBench,
) -> None:
    bench = await intx_bench(vdev_bench)
    bench.device.irq.raise_intx()
    assert bench.irqs.take() == [Fired(INTX, 0)]
    await bench.config_write(0x3C, 11, 1)  # Interrupt Line
    await bench.enable(memory=True, io=False, master=True)
    bench.set_irqs(MSIX, 0, 4)
    bench.unmask_irqs(MSI, 0, 4)
    assert bench.irqs.take() == []


async def test_re_enabling_intx_after_the_level_dropped_sends_nothing(vdev_bench: OpenBench) -> None:
    bench = await intx_bench(vdev_bench)
    command = await bench.config_read(PCI_COMMAND, 2)
    await bench.config_write(PCI_COMMAND, command | PCI_COMMAND_INTX_DISABLE, 2)
    bench.device.irq.raise_intx()
    bench.device.irq.lower_intx()
    await bench.config_write(PCI_COMMAND, command, 2)
    assert bench.irqs.take() == []


async def test_intx_masked_with_set_irqs_fires_on_unmask_only_while_still_high(vdev_bench: OpenBench) -> None:
    bench = await intx_bench(vdev_bench)
    bench.mask_irqs(INTX)
    bench.device.irq.raise_intx()
    assert bench.irqs.take() == []
    bench.unmask_irqs(INTX)
    assert bench.irqs.take() == [Fired(INTX, 0)]
    bench.mask_irqs(INTX)
    bench.unmask_irqs(INTX)
    assert bench.irqs.take() == [Fired(INTX, 0)]  # a level: each unmask while high signals again
    bench.device.irq.lower_intx()
    bench.mask_irqs(INTX)
    bench.unmask_irqs(INTX)
    assert bench.irqs.take() == []


async def test_intx_without_an_eventfd_is_lost_not_held(vdev_bench: OpenBench) -> None:
    bench = await vdev_bench(Vectors(), wired=False)
    await bench.enable(memory=True, io=False, master=False)
    bench.device.irq.raise_intx()
    assert bench.irqs.take() == [] and bench.irqs.lost == [Fired(INTX, 0)]
    bench.set_irqs(INTX)
    assert bench.irqs.take() == []


# -- which mechanism, and the others ----------------------------------------------------


async def test_trigger_uses_msix_over_msi_over_intx(vdev_bench: OpenBench) -> None:
    bench = await vdev_bench(Vectors())
    await bench.enable(memory=True, io=False, master=True)
    await bench.enable_msi(1)
    await bench.enable_msix()
    await ring(bench, 0)
    msix_control = capability_at(bench, MsiX) + 2
    await bench.config_write(msix_control, 0, 2)
    await ring(bench, 0)
    msi_control = capability_at(bench, Msi) + 2
    await bench.config_write(msi_control, 0, 2)
    await ring(bench, 0)
    assert bench.irqs.take() == [Fired(MSIX, 0), Fired(MSI, 0), Fired(INTX, 0)]
    assert bench.device.irq.intx_level  # INTx is a level: trigger raised it, the device must lower it


async def test_err_and_req_reach_the_client(vdev_bench: OpenBench) -> None:
    bench = await vdev_bench(Vectors())
    bench.device.irq.report_error()
    bench.device.irq.request_release()
    assert bench.irqs.take() == [Fired(IrqIndex.ERR, 0), Fired(IrqIndex.REQ, 0)]


async def test_msix_function_mask_bit_is_what_the_client_wrote(vdev_bench: OpenBench) -> None:
    bench = await msix_bench(vdev_bench, function_masked=True)
    control = await bench.config_read(capability_at(bench, MsiX) + 2, 2)
    assert control & (PCI_MSIX_FLAGS_ENABLE | PCI_MSIX_FLAGS_MASKALL) == PCI_MSIX_FLAGS_ENABLE | PCI_MSIX_FLAGS_MASKALL
    assert control & 0x7FF == 3  # table size: 4 vectors, read-only
