"""One faulted read of ``Hello``'s id register by QEMU through the proxy, and what QEMU made of it.

Shared by tests/proxy/test_qemu_faults.py and by the reproduction of
docs/findings.md's QEMU findings (``tools/findings/qemu_partial_reply.py``),
so both drive QEMU the same way and classify what happened the same way.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import trio

from tests.proxy.support import HELLO_IDS, MSG_TIMEOUT_MS, Behind
from vdev import Device, RegionRead
from vdev.model.events import DeviceEvent
from vdev.protocol import Command
from vdev.proxy import Direction, FaultRule, MessageKind, WireFault, WireFaultPlan
from vdev.qemu import QemuExitedError, QemuMachine, QTestClosedError
from vdev.testing import vfio_user_pci

#: What QEMU gives the guest for a read that failed.
ALL_ONES = 0xFFFF_FFFF
#: QEMU's own default ``x-msg-timeout``: far longer than QEMU is ever held stopped.
DEFAULT_MSG_TIMEOUT_MS = 5000


def on_id_reply(fault: WireFault) -> WireFaultPlan:
    """A plan applying ``fault`` to the server's reply to the first read of BAR0's id register."""
    rule = FaultRule(
        fault,
        direction=Direction.TO_CLIENT,
        message=MessageKind.REPLY,
        command=Command.REGION_READ,
        region=0,
        offset=0,
    )
    return WireFaultPlan([rule])


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

    @property
    def outcome(self) -> str:
        """``sigsegv``, ``timeout`` (the read waited out x-msg-timeout), ``error`` (it failed at once), ``value``."""
        if self.died is not None:
            return "sigsegv" if self.died == -signal.SIGSEGV else f"died {self.died}"
        if "timed out waiting for reply" in self.stderr:
            return "timeout"
        if self.value == ALL_ONES:
            return "error"
        return "value"

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {"outcome": self.outcome, "stderr": self.stderr.splitlines()[-6:]}


async def wait_for_stderr(vm: QemuMachine, text: str, timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while text not in vm.stderr_tail(200):
            await trio.sleep(0.02)


def stop_on_id_read(device: Device, pid: int) -> Callable[[], None]:
    """Stop QEMU (SIGSTOP) when the server reads the id register, before it replies; returns the unsubscribe.

    The server answers only once QEMU is entirely stopped (the stop is
    reported to its parent, this process, through ``waitid``), so whatever
    the proxy makes of the reply is all in QEMU's socket when it resumes.
    """

    def stop(event: DeviceEvent) -> None:
        if isinstance(event, RegionRead) and (event.region, event.offset) == (0, 0x00):
            os.kill(pid, signal.SIGSTOP)
            state = os.waitid(os.P_PID, pid, os.WSTOPPED | os.WEXITED | os.WNOWAIT)
            if state is None or state.si_code != os.CLD_STOPPED:
                raise RuntimeError(f"QEMU did not stop: {state}")

    return device.events.subscribe(stop)


async def read_id_through(
    setup: Behind,
    *,
    wait_for: tuple[str, ...] = (),
    again: bool = False,
    hold_until_hangup: bool = False,
    binary: Path | None = None,
) -> QemuRun:
    """Start QEMU on the proxy, read the id register, wait for stderr lines, maybe read again.

    ``hold_until_hangup`` stops QEMU while the server answers the read and
    resumes it once the proxy has closed the connection (a ``Close`` fault),
    so QEMU finds the cut reply and the hangup together; QEMU then waits up
    to its default ``x-msg-timeout``, since it is never meant to time out.
    """
    value = seconds = second = None
    timeout = DEFAULT_MSG_TIMEOUT_MS if hold_until_hangup else MSG_TIMEOUT_MS
    machine = QemuMachine(binary=binary, devices=[vfio_user_pci(setup.proxy_path, **{"x-msg-timeout": timeout})])
    died = None
    try:
        async with machine as vm:
            function = await (await vm.pci_bus()).find(*HELLO_IDS)
            await function.map_bars()
            await function.enable(memory=True, io=False, master=False)
            started = trio.current_time()
            if hold_until_hangup:
                value = await _read_held_until_hangup(setup, machine, lambda: function.bar_readl(0, 0x00))
            else:
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


async def _read_held_until_hangup(setup: Behind, machine: QemuMachine, read: Callable[[], Any]) -> int:
    pid = machine.pid
    assert pid is not None
    values: list[int] = []

    async def reader() -> None:
        values.append(await read())

    unsubscribe = stop_on_id_read(setup.device, pid)
    try:
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(reader)
                await setup.proxy.wait_closed()
                os.kill(pid, signal.SIGCONT)
    finally:
        unsubscribe()
        if machine.returncode is None:
            os.kill(pid, signal.SIGCONT)
    return values[0]
