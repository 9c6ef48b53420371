"""Over 200 distinct malformed messages: each gets an error or a clean close, and the server serves on.

A few are accepted by libvfio-user itself (``Case.lenient`` says why, see
docs/limitations.md); for those a success answer is tolerated, never a crash.

After every case a well-behaved client connects, negotiates and reads the
device's IDs; a second device in the same process is checked at the end,
and its accesses must have kept working while bad clients stalled.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable

import pytest
import trio

from tests.robustness.cases import Case, all_cases
from vdev import Device
from vdev.client import Client, ServerDisconnected
from vdev.protocol import ErrorReply, RemoteProtocolError
from vdev.runtime import DeviceContext
from vdev_devices.edu import Edu
from vdev_devices.hello import Hello

pytestmark = pytest.mark.requires("libvfio-user")
Serve = Callable[[Device], Awaitable[DeviceContext]]
CASES = all_cases()


async def send_case(path: os.PathLike[str], case: Case) -> str:
    """What the server did with the case: ``error``, ``closed``, ``silent`` or ``reply``."""
    fds = case.fds()
    try:
        async with Client.connect(path, negotiate=case.negotiate) as client:
            await client.send_raw(case.data, fds)
            with trio.move_on_after(2.5):
                try:
                    answer = await client.receive_raw()
                except (ServerDisconnected, RemoteProtocolError):
                    return "closed"
                return "error" if isinstance(answer, ErrorReply) else "reply"
            return "silent"
    except ServerDisconnected:
        return "closed"
    finally:
        for fd in fds:
            os.close(fd)


async def well_behaved(path: os.PathLike[str]) -> bytes:
    with trio.fail_after(10):
        async with Client.connect(path) as client:
            return await client.region_read(7, 0, 4)


async def test_at_least_200_distinct_cases() -> None:
    assert len({case.name for case in CASES}) == len(CASES) >= 200


async def test_every_malformed_message_is_refused_and_the_server_serves_on(vdev_serve: Serve) -> None:
    edu, bystander = Edu(), Hello()
    target = await vdev_serve(edu)
    other = await vdev_serve(bystander)
    outcomes: dict[str, list[str]] = {}
    async with Client.connect(other.socket_path) as watcher, trio.open_nursery() as nursery:
        await watcher.enable(memory=True, io=False, master=False)
        bystander_reads = 0

        async def keep_reading() -> None:
            nonlocal bystander_reads
            while True:
                assert await watcher.region_read(0, 0, 4) == (0x48454C4F).to_bytes(4, "little")
                bystander_reads += 1
                await trio.sleep(0.01)

        nursery.start_soon(keep_reading)
        for case in CASES:
            outcome = await send_case(target.socket_path, case)
            outcomes.setdefault(outcome, []).append(case.name)
            if case.lenient:
                allowed = {"error", "closed", "reply"}
            else:
                allowed = {"error", "closed", "silent"} if case.expect_silence else {"error", "closed"}
            assert outcome in allowed, f"{case.name}: {outcome}"
            assert await well_behaved(target.socket_path) == (0x11E81234).to_bytes(4, "little"), case.name
        nursery.cancel_scope.cancel()
    assert bystander_reads > len(CASES) // 4
    assert sum(len(names) for names in outcomes.values()) == len(CASES)
