"""COMMAND as device code sees it: ``Device.wait_for_command`` wakes on every path a transition takes.

Ordering is proven with :func:`trio.testing.wait_all_tasks_blocked` — the
waiter has nothing left to do but wait — never with a sleep.
"""

from __future__ import annotations

from collections.abc import Callable

import trio
import trio.testing

from vdev import CommandRegister, ResetKind
from vdev.testing import OpenBench
from vdev_devices.hello import Hello


async def test_it_returns_at_once_when_command_already_satisfies_the_predicate(vdev_bench: OpenBench) -> None:
    bench = await vdev_bench(Hello())
    await bench.enable(memory=True, io=False, master=False)
    with trio.fail_after(5):
        command = await bench.device.wait_for_command(lambda c: c.memory)
    assert command.memory and not command.master


async def test_it_sleeps_through_writes_that_do_not_satisfy_it_and_wakes_on_the_one_that_does(
    vdev_bench: OpenBench,
) -> None:
    bench = await vdev_bench(Hello())
    seen: list[CommandRegister] = []

    async def wait_for_mastering() -> None:
        seen.append(await bench.device.wait_for_command(lambda c: c.master))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait_for_mastering)
        await trio.testing.wait_all_tasks_blocked()
        await bench.enable(memory=True, io=True, master=False)
        await bench.config_write(0x3C, 10, 1)  # a config write that does not touch COMMAND
        await trio.testing.wait_all_tasks_blocked()
        assert seen == []
        await bench.enable(memory=True, io=True, master=True)
    assert len(seen) == 1 and seen[0].master and seen[0].memory and seen[0].io


async def test_device_side_changes_and_resets_wake_it_too(vdev_bench: OpenBench) -> None:
    bench = await vdev_bench(Hello())
    await bench.enable(memory=True, io=False, master=True)
    seen: list[CommandRegister] = []

    async def wait_for(predicate: Callable[[CommandRegister], bool]) -> None:
        seen.append(await bench.device.wait_for_command(predicate))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait_for, lambda c: not c.memory)
        await trio.testing.wait_all_tasks_blocked()
        bench.device.command_control.force(memory=False)  # the device clears its own MEM bit
    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait_for, lambda c: not c.master)
        await trio.testing.wait_all_tasks_blocked()
        await bench.reset(ResetKind.FLR)
    assert [(c.memory, c.master) for c in seen] == [(False, True), (False, False)]
