"""Every fault as QEMU's vfio-user-pci sees it: what a qtest read returns and what QEMU says on stderr.

QEMU is attached to a served ``Hello`` through the proxy with
``x-msg-timeout`` at 500 ms; each plan targets the reply to the first read of
BAR0's id register (the register is trapped, so the read is a REGION_READ).
After QEMU is gone, a new client connects through the same proxy: the
server outlived the fault.

The last test passes no fault: QEMU mmaps a ``membar`` region through the
fd the proxy relayed in the GET_REGION_INFO reply.

Two faults crash QEMU 11.1 (SIGSEGV): a reply cut short so that QEMU holds a
partial message when the request times out (``truncate`` without resizing,
``close`` in the middle of a reply).  Those tests check what QEMU reports
first and accept either outcome, so they keep passing once QEMU is fixed.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from tests.proxy.support import (
    HELLO_ID_VALUE,
    HELLO_IDS,
    MSG_TIMEOUT_MS,
    Behind,
    assert_still_served,
    behind_proxy,
)
from vdev.protocol import Command
from vdev.proxy import (
    Close,
    Delay,
    Direction,
    Drop,
    Duplicate,
    ExtraFds,
    FaultPlan,
    FaultRule,
    MessageKind,
    Oversize,
    Truncate,
    WrongId,
)
from vdev.qemu import QemuExitedError, QemuMachine, QTestClosedError
from vdev.testing import vfio_user_pci
from vdev_devices.membar import MemBar

pytestmark = pytest.mark.requires("qemu", "libvfio-user")

ALL_ONES = 0xFFFF_FFFF


def on_id_reply(fault: object) -> FaultPlan:
    rule = FaultRule(
        fault,  # type: ignore[arg-type]
        direction=Direction.TO_CLIENT,
        message=MessageKind.REPLY,
        command=Command.REGION_READ,
        region=0,
        offset=0,
    )
    return FaultPlan([rule])


@dataclass
class QemuRun:
    """What one QEMU session saw of the faulted read."""

    #: The first read of the id register; ``None`` if QEMU died before answering.
    value: int | None
    #: How long that read took, in seconds.
    seconds: float | None
    #: A second read of the id register, when asked for.
    again: int | None
    stderr: str
    #: QEMU's exit status if it died on its own (negative: killed by that signal).
    died: int | None


async def wait_for_stderr(vm: QemuMachine, text: str, timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while text not in vm.stderr_tail(200):
            await trio.sleep(0.02)


async def read_id_through(setup: Behind, *, wait_for: tuple[str, ...] = (), again: bool = False) -> QemuRun:
    """Start QEMU on the proxy, read the id register, wait for stderr lines, maybe read again."""
    value = seconds = second = None
    machine = QemuMachine(devices=[vfio_user_pci(setup.proxy_path, **{"x-msg-timeout": MSG_TIMEOUT_MS})])
    died = None
    try:
        async with machine as vm:
            function = await (await vm.pci_bus()).find(*HELLO_IDS)
            await function.map_bars()
            await function.enable(memory=True, io=False, master=False)
            started = trio.current_time()
            value = await function.bar_readl(0, 0x00)
            seconds = trio.current_time() - started
            for text in wait_for:
                await wait_for_stderr(vm, text)
            if again:
                second = await function.bar_readl(0, 0x00)
    except (QemuExitedError, QTestClosedError):
        died = machine.returncode
        assert died is not None
    return QemuRun(value, seconds, second, machine.stderr_tail(200), died)


async def test_a_reply_delayed_past_the_timeout_reads_all_ones(vdev_socket_dir: Path) -> None:
    async with behind_proxy(vdev_socket_dir, plan=on_id_reply(Delay(1.5))) as setup:
        run = await read_id_through(setup, wait_for=("unexpected reply",))
        assert run.value == ALL_ONES
        assert run.seconds is not None and MSG_TIMEOUT_MS / 1000 <= run.seconds < 1.5
        assert "vfio_user_device_io_region_read: timed out waiting for reply" in run.stderr
        # The late reply then finds no request waiting for it.
        assert run.stderr.index("timed out waiting for reply") < run.stderr.index("unexpected reply")
        assert run.died is None
        await assert_still_served(setup.proxy_path)


async def test_a_dropped_reply_times_out_and_the_next_read_works(vdev_socket_dir: Path) -> None:
    async with behind_proxy(vdev_socket_dir, plan=on_id_reply(Drop())) as setup:
        run = await read_id_through(setup, again=True)
        assert run.value == ALL_ONES
        assert "timed out waiting for reply" in run.stderr
        assert run.again == HELLO_ID_VALUE
        await assert_still_served(setup.proxy_path)


async def test_a_duplicated_reply_is_an_unexpected_reply_for_qemu(vdev_socket_dir: Path) -> None:
    async with behind_proxy(vdev_socket_dir, plan=on_id_reply(Duplicate())) as setup:
        run = await read_id_through(setup, wait_for=("unexpected reply",))
        assert run.value == HELLO_ID_VALUE  # the first copy answers the read
        assert run.died is None
        await assert_still_served(setup.proxy_path)


async def test_a_reply_with_the_wrong_id_leaves_the_read_unanswered(vdev_socket_dir: Path) -> None:
    async with behind_proxy(vdev_socket_dir, plan=on_id_reply(WrongId())) as setup:
        run = await read_id_through(setup)
        assert run.value == ALL_ONES
        assert "unexpected reply" in run.stderr
        assert "timed out waiting for reply" in run.stderr
        await assert_still_served(setup.proxy_path)


async def test_a_short_reply_is_taken_at_face_value_by_qemu(vdev_socket_dir: Path) -> None:
    # Header, access struct and the first two data bytes, with the size field saying so.
    async with behind_proxy(vdev_socket_dir, plan=on_id_reply(Truncate(keep=34))) as setup:
        run = await read_id_through(setup, again=True)
        # QEMU 11.1 does not check the reply's length: half the register, no error.
        assert run.value == HELLO_ID_VALUE & 0xFFFF
        assert "region_read" not in run.stderr
        assert run.again == HELLO_ID_VALUE
        await assert_still_served(setup.proxy_path)


async def test_a_truncated_frame_leaves_qemu_waiting_for_the_rest(vdev_socket_dir: Path) -> None:
    async with behind_proxy(vdev_socket_dir, plan=on_id_reply(Truncate(resize=False))) as setup:
        run = await read_id_through(setup)
        if run.died is None:
            assert run.value == ALL_ONES
            assert "timed out waiting for reply" in run.stderr
        else:
            # QEMU 11.1: the request times out while its reply is half received,
            # and QEMU crashes.
            assert run.died == -signal.SIGSEGV
        await assert_still_served(setup.proxy_path)


async def test_an_oversized_reply_is_refused_by_qemu(vdev_socket_dir: Path) -> None:
    async with behind_proxy(vdev_socket_dir, plan=on_id_reply(Oversize())) as setup:
        run = await read_id_through(setup)
        assert run.value == ALL_ONES
        assert "reply larger than recv buffer" in run.stderr
        await assert_still_served(setup.proxy_path)


async def test_unexpected_fds_on_a_reply_are_refused_by_qemu(vdev_socket_dir: Path) -> None:
    async with behind_proxy(vdev_socket_dir, plan=on_id_reply(ExtraFds())) as setup:
        run = await read_id_through(setup)
        assert run.value == ALL_ONES
        assert "unexpected FDs in reply" in run.stderr
        await assert_still_served(setup.proxy_path)


async def test_a_connection_closed_between_messages(vdev_socket_dir: Path) -> None:
    async with behind_proxy(vdev_socket_dir, plan=on_id_reply(Close(after=0))) as setup:
        run = await read_id_through(setup, again=True)
        assert run.value == ALL_ONES
        assert "failed to read header: EOF" in run.stderr
        assert run.again == ALL_ONES  # no reconnection
        assert "Unable to write to socket" in run.stderr
        await assert_still_served(setup.proxy_path)


async def test_a_connection_closed_mid_reply_is_server_closed_socket(vdev_socket_dir: Path) -> None:
    async with behind_proxy(vdev_socket_dir, plan=on_id_reply(Close())) as setup:
        run = await read_id_through(setup, wait_for=("server closed socket",))
        assert "server closed socket" in run.stderr
        if run.died is None:
            assert run.value == ALL_ONES
        else:
            assert run.died == -signal.SIGSEGV  # QEMU 11.1, as for the truncated frame
        await assert_still_served(setup.proxy_path)


async def test_a_dropped_posted_write_never_reaches_the_device(vdev_socket_dir: Path) -> None:
    plan = FaultPlan(
        [FaultRule(Drop(), direction=Direction.TO_SERVER, command=Command.REGION_WRITE, region=0, offset=0x04)]
    )
    async with behind_proxy(vdev_socket_dir, plan=plan) as setup:
        async with QemuMachine(devices=[vfio_user_pci(setup.proxy_path)]) as vm:
            function = await (await vm.pci_bus()).find(*HELLO_IDS)
            await function.map_bars()
            await function.enable(memory=True, io=False, master=False)
            await function.bar_writel(0, 0x04, 0x1234_5678)  # posted: QEMU does not wait
            await function.bar_writel(0, 0x04, 0x9ABC_DEF0)
            assert await function.bar_readl(0, 0x04) == 0x9ABC_DEF0
        (fault,) = setup.proxy.injected
        assert (fault.fault, fault.is_reply, fault.region, fault.offset) == ("drop", False, 0, 0x04)
        writes = [e.data for e in setup.device.events.of_kind("region_write") if e.data.get("region") == 0]
        assert len(writes) == 1
        await assert_still_served(setup.proxy_path)


async def test_qemu_maps_a_region_fd_passed_through_the_proxy(vdev_socket_dir: Path) -> None:
    device = MemBar(size="1M")
    async with behind_proxy(vdev_socket_dir, device) as setup:
        async with QemuMachine(devices=[vfio_user_pci(setup.proxy_path)]) as vm:
            function = await (await vm.pci_bus()).find(0x1B36, 0x0F01)
            await function.map_bars()
            await function.enable(memory=True, io=False, master=True)
            await function.bar_writeq(0, 0x2000, 0x0123_4567_89AB_CDEF)  # into QEMU's mapping of the fd
            assert device.bar(0).memory[0x2000:0x2008] == (0x0123_4567_89AB_CDEF).to_bytes(8, "little")
        assert not [e for e in setup.device.events.of_kind("region_write") if e.data.get("region") == 0]
