"""The bench's promises: a device driven in-process through the runtime's entry points, nothing faked.

No socket and no libvfio-user here: these run on any machine.
"""

from __future__ import annotations

import doctest

import pytest
import trio

import vdev.testing.bench
import vdev.testing.conformance
import vdev.testing.peer
from vdev import RO, Bar, Device, DmaError, Register, ResetKind
from vdev.model.events import Quiesce, RegionRead, Violation
from vdev.model.pci_regs import PCI_COMMAND, PCI_COMMAND_INTX_DISABLE
from vdev.protocol.constants import IrqIndex
from vdev.testing import DmaTransfer, Fired, OpenBench, open_bench
from vdev_devices.edu import Edu
from vdev_devices.hello import Hello
from vdev_devices.idio16 import Idio16
from vdev_devices.membar import MemBar

EDU_DMA_WINDOW = 0x40000


def test_the_docstring_examples_run() -> None:
    for module in (vdev.testing.bench, vdev.testing.conformance, vdev.testing.peer):
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0, module.__name__


async def test_registers_by_name_take_their_width_and_offsets_take_four_bytes(vdev_bench: OpenBench) -> None:
    bench = await vdev_bench(MemBar(size="1M"))
    await bench.enable(memory=True, io=False, master=False)
    await bench.write(2, "epoch", 0x1122_3344_5566_7788)
    assert await bench.read(2, "epoch") == 0x1122_3344_5566_7788
    assert await bench.read(2, 0x0) == 0x5566_7788
    assert await bench.read(2, 0x4, size=2) == 0x3344
    assert await bench.read(2, "bar0_size") == 1 << 20
    await bench.write(2, "bar0_size", 0)  # RO
    assert bench.device.bar2["bar0_size"] == 1 << 20
    await bench.write(0, 0x2000, 0xABCD, size=2)  # a mapped area: the same bytes the client maps
    assert bench.device.bar(0).memory[0x2000:0x2002] == b"\xcd\xab"


async def test_hooks_run_as_they_do_when_served(vdev_bench: OpenBench) -> None:
    bench = await vdev_bench(Hello(ident=0x1234))
    await bench.enable(memory=True, io=False, master=False)
    assert [await bench.read(0, "id") for _ in range(3)] == [0x1234] * 3
    assert await bench.read(0, "reads") == 3
    reads = bench.device.events.of_kind(RegionRead)
    assert reads[0] == RegionRead(region=0, offset=0, size=4, value=0x1234)


async def test_a_bar_answers_only_while_its_decoding_is_on(vdev_bench: OpenBench) -> None:
    bench = await vdev_bench(Idio16())
    await bench.enable(memory=True, io=False, master=False)
    assert await bench.read(2, "out0_7") == 0xFF  # I/O decoding off: master abort
    assert bench.device.events.of_kind(Violation)[0].what == "access while disabled"
    await bench.enable(memory=False, io=True, master=False)
    await bench.write(2, "out0_7", 0x5)
    assert await bench.read(2, "out0_7") == 0x5 and bench.device.outputs == 0x5


async def test_enable_sets_exactly_the_bits_named_and_keeps_the_others(vdev_bench: OpenBench) -> None:
    bench = await vdev_bench(Hello())
    await bench.config_write(PCI_COMMAND, PCI_COMMAND_INTX_DISABLE | 0x1, 2)
    await bench.enable(memory=True, io=False, master=True)
    assert await bench.config_read(PCI_COMMAND, 2) == PCI_COMMAND_INTX_DISABLE | 0x2 | 0x4
    await bench.enable(memory=False, io=False, master=False)
    assert await bench.config_read(PCI_COMMAND, 2) == PCI_COMMAND_INTX_DISABLE


async def test_unknown_bars_and_registers_are_named_in_the_error(vdev_bench: OpenBench) -> None:
    bench = await vdev_bench(Hello())
    with pytest.raises(ValueError, match="hello has no BAR3"):
        await bench.read(3, 0)
    with pytest.raises(KeyError, match="no register 'scrach' .*registers: id, scratch, reads, doorbell"):
        await bench.write(0, "scrach", 1)


async def test_edu_moves_data_both_ways_through_client_memory(vdev_bench: OpenBench, autojump_clock: object) -> None:
    """edu's DMA engine waits 100 ms before each transfer: the autojump clock makes that instant."""
    bench = await vdev_bench(Edu())
    await bench.enable(memory=True, io=False, master=True)
    ram = await bench.dma_map(0x10_0000, 0x4000)
    pattern = bytes(range(200))
    ram[0x100 : 0x100 + len(pattern)] = pattern

    async def transfer(source: int, destination: int, to_ram: bool) -> None:
        for offset, value in ((0x80, source), (0x88, destination), (0x90, len(pattern))):
            await bench.write(0, offset, value, size=8)
        await bench.write(0, 0x98, 0x1 | 0x4 | (0x2 if to_ram else 0), size=8)
        with trio.fail_after(5):
            await bench.irqs.wait(IrqIndex.INTX)
        assert await bench.read(0, 0x24) == 0x100
        await bench.write(0, 0x64, 0x100)  # acknowledge: INTx drops
        bench.irqs.take()

    await transfer(0x10_0100, EDU_DMA_WINDOW, to_ram=False)
    assert bytes(bench.device.dma_buffer[: len(pattern)]) == pattern
    await transfer(EDU_DMA_WINDOW, 0x10_2000, to_ram=True)
    assert ram[0x2000 : 0x2000 + len(pattern)] == pattern
    assert bench.memory.transfers == [DmaTransfer("read", 0x10_0100, 200), DmaTransfer("write", 0x10_2000, 200)]
    assert not bench.device.irq.intx_level


async def test_dma_without_bus_mastering_never_reaches_client_memory(vdev_bench: OpenBench) -> None:
    bench = await vdev_bench(Edu(dma_delay=0))
    await bench.enable(memory=True, io=False, master=False)
    await bench.dma_map(0x10_0000, 0x1000)
    with pytest.raises(DmaError, match="bus mastering is disabled"):
        await bench.device.dma.read(0x10_0000, 4)
    await bench.enable(memory=True, io=False, master=True)
    with pytest.raises(DmaError, match="not inside memory the client mapped"):
        await bench.device.dma.read(0x10_0FFE, 4)
    assert bench.memory.transfers == []
    assert [e.what for e in bench.device.events.of_kind(Violation)] == ["dma", "dma"]


async def test_factorial_runs_in_the_background_and_interrupts(vdev_bench: OpenBench) -> None:
    bench = await vdev_bench(Edu())
    await bench.enable(memory=True, io=False, master=True)
    await bench.enable_msi()
    await bench.write(0, 0x20, 0x80)  # interrupt when done
    await bench.write(0, 0x08, 10)
    with trio.fail_after(5):
        assert await bench.irqs.wait() == Fired(IrqIndex.MSI, 0)
    assert await bench.read(0, 0x08) == 3628800


class Touchy(Device):
    """A register whose hook fails, and a quiesce hook that records when it ran."""

    vendor_id = 0x1B36
    device_id = 0x70C4
    bar0 = Bar(4096, registers=[Register("broken", 0x0), Register("kept", 0x4, access=RO, reset=7, sticky=True)])

    def __init__(self) -> None:
        super().__init__()
        self.quiesced = 0

    @bar0.on_read("broken")
    def read_broken(self) -> int:
        raise RuntimeError("deliberately broken")

    async def on_quiesce(self) -> None:
        self.quiesced += 1
        self.events.record(Quiesce(done=True))


async def test_a_handler_failure_reaches_the_test(vdev_bench: OpenBench) -> None:
    bench = await vdev_bench(Touchy())
    await bench.enable(memory=True, io=False, master=False)
    with pytest.raises(RuntimeError, match="deliberately broken"):
        await bench.read(0, "broken")
    assert await bench.read(0, "kept") == 7


async def test_dma_mapping_and_reset_quiesce_the_device_first(vdev_bench: OpenBench) -> None:
    bench = await vdev_bench(Touchy())
    await bench.enable(memory=True, io=False, master=True)
    await bench.dma_map(0x1000, 0x1000)
    with pytest.raises(ValueError, match="overlaps"):
        await bench.dma_map(0x1800, 0x1000)
    await bench.dma_unmap(0x1000)
    await bench.reset(ResetKind.DEVICE)
    kinds = [e.kind for e in bench.device.events if e.kind in ("quiesce", "dma_map", "dma_unmap", "reset")]
    assert kinds == ["quiesce", "dma_map", "quiesce", "dma_unmap", "quiesce", "reset"]
    assert not bench.device.command.memory  # a device reset restores power-on config space
    assert bench.device.bar0["kept"] == 7


async def test_the_bench_attaches_as_a_client_and_detaches_on_exit() -> None:
    device = Hello()
    async with open_bench(device) as bench:
        assert device.irq.sink is bench.irqs and device.dma.port is bench.memory
    assert device.irq.sink is None and device.dma.port is None
    assert [e.kind for e in device.events if e.kind in ("connect", "disconnect")] == ["connect", "disconnect"]


class Crashing(Device):
    """Background work that fails at once."""

    vendor_id = 0x1B36
    device_id = 0xC4A5

    async def run(self) -> None:
        raise RuntimeError("the device's own task failed")


async def test_a_failing_run_task_fails_the_test_instead_of_being_logged() -> None:
    with pytest.RaisesGroup(pytest.RaisesExc(RuntimeError, match="own task failed"), flatten_subgroups=True):
        async with open_bench(Crashing()):
            await trio.sleep_forever()
