"""D3hot through PMCSR: like hardware, a function out of D0 decodes no memory, whatever COMMAND says.

membar carries a Power Management capability; in D3hot its trapped accesses
get the ``disabled_access`` policy and its mapped areas the
``mapping_when_disabled`` policy, exactly as with COMMAND.MEM off, and D0
brings back what MEM-on brings back.
"""

from __future__ import annotations

from vdev import AccessWhileDisabled, MemoryAction, PowerChange, PowerManagement, ResetKind
from vdev.testing import OpenBench
from vdev_devices.membar import MemBar

D0, D1, D3HOT = 0, 1, 3


def pmcsr(bench: OpenBench) -> int:
    placed = bench.device.config.find(PowerManagement)
    assert placed is not None, "membar has no Power Management capability"
    return placed.register("pmcsr").offset


async def set_power(bench: OpenBench, state: int) -> None:
    await bench.config_write(pmcsr(bench), state, 2)


async def test_d3hot_master_aborts_trapped_accesses_and_d0_brings_them_back(vdev_bench: OpenBench) -> None:
    bench = await vdev_bench(MemBar(size="64K"))
    await bench.enable(memory=True, io=False, master=False)
    await bench.write(2, "epoch", 5)
    await set_power(bench, D3HOT)
    assert bench.device.power_state == D3HOT and bench.device.command.memory  # MEM is still set
    assert await bench.read(2, "epoch") == (1 << 64) - 1
    violations = bench.device.events.of_kind(AccessWhileDisabled)
    assert [(v.region, v.access) for v in violations] == [(2, "read")]
    await set_power(bench, D0)
    assert await bench.read(2, "epoch") == 5
    assert [(e.old, e.new, e.source) for e in bench.device.events.of_kind(PowerChange)] == [
        (D0, D3HOT, "client"),
        (D3HOT, D0, "client"),
    ]


async def test_d3hot_revokes_mapped_areas_and_d0_restores_their_contents(vdev_bench: OpenBench) -> None:
    bench = await vdev_bench(MemBar(size="64K", mapping="revoke"))
    await bench.enable(memory=True, io=False, master=False)
    await bench.device.region_write(0, 0x1000, b"kept")
    await set_power(bench, D3HOT)
    assert bench.device.bar(0).mapped is not None and bench.device.bar(0).mapped.revoked
    await set_power(bench, D0)
    assert await bench.device.region_read(0, 0x1000, 4) == b"kept"
    assert [e.action for e in bench.device.events.of_kind(MemoryAction) if e.bar == 0] == [
        "revoke",
        "restore",
    ]


async def test_mem_and_power_state_together_run_each_policy_once_per_change_of_decoding(
    vdev_bench: OpenBench,
) -> None:
    bench = await vdev_bench(MemBar(size="64K", mapping="revoke"))
    await bench.enable(memory=True, io=False, master=False)
    await set_power(bench, D3HOT)  # decoding off
    await bench.enable(memory=False, io=False, master=False)  # still off: nothing more to revoke
    await set_power(bench, D0)  # still off: MEM is clear
    assert await bench.read(2, "epoch") == (1 << 64) - 1
    await bench.enable(memory=True, io=False, master=False)  # decoding on
    assert await bench.read(2, "epoch") == 0
    assert [e.action for e in bench.device.events.of_kind(MemoryAction) if e.bar == 0] == [
        "revoke",
        "restore",
    ]


async def test_a_state_the_capability_does_not_offer_is_ignored(vdev_bench: OpenBench) -> None:
    bench = await vdev_bench(MemBar(size="64K"))
    await bench.enable(memory=True, io=False, master=False)
    await set_power(bench, D1)
    assert await bench.config_read(pmcsr(bench), 2) & 0x3 == D0
    assert bench.device.power_state == D0 and not bench.device.events.of_kind(PowerChange)
    assert await bench.read(2, "bar0_size") == 64 << 10


async def test_a_reset_in_d3hot_returns_to_d0_with_memory_decoding_as_command_says(vdev_bench: OpenBench) -> None:
    bench = await vdev_bench(MemBar(size="64K", mapping="revoke"))
    await bench.enable(memory=True, io=False, master=False)
    await set_power(bench, D3HOT)
    await bench.reset(ResetKind.FLR)
    assert bench.device.power_state == D0 and not bench.device.command.memory
    assert [(e.new, e.source) for e in bench.device.events.of_kind(PowerChange)] == [
        (D3HOT, "client"),
        (D0, "reset"),
    ]
    await bench.enable(memory=True, io=False, master=False)
    await bench.write(2, "epoch", 7)
    assert await bench.read(2, "epoch") == 7
    assert await bench.read(2, "bar0_size") == 64 << 10  # it describes the BAR: a reset keeps it
