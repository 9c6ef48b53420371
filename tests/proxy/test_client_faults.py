"""Every fault as vdev's own client sees it, fds passing through the proxy, and the server surviving.

The client here is ``vdev.client.Client`` and the device a served ``Hello``
(``membar``/``edu`` where fds matter); each test ends by connecting a new
client through the same proxy, which proves both the server and the proxy
outlived the fault.
"""

from __future__ import annotations

import errno
import io
import json
import os
from pathlib import Path

import pytest
import trio

from tests.proxy.support import (
    CONFIG,
    HELLO_ID_VALUE,
    assert_still_served,
    behind_proxy,
    enable_memory,
    hello_id,
)
from vdev.client import Client, ServerDisconnected
from vdev.protocol import (
    Command,
    IrqIndex,
    RegionReadReply,
    RegionReadRequest,
    RemoteProtocolError,
)
from vdev.proxy import (
    Close,
    Delay,
    Direction,
    Drop,
    Duplicate,
    ExtraFds,
    FaultRule,
    Oversize,
    Truncate,
    WireFaultPlan,
    WrongId,
    describe_fd,
    load_transcript,
)
from vdev_devices.edu import Edu
from vdev_devices.hello import Hello
from vdev_devices.membar import MemBar

pytestmark = pytest.mark.requires("libvfio-user")


def on_id_reply(fault: object, **selectors: object) -> WireFaultPlan:
    """A plan applying ``fault`` to the reply of the first read of Hello's id register."""
    rule = FaultRule(
        fault,  # type: ignore[arg-type]
        direction=Direction.TO_CLIENT,
        command=Command.REGION_READ,
        region=0,
        offset=0,
        **selectors,  # type: ignore[arg-type]
    )
    return WireFaultPlan([rule])


async def test_a_delayed_reply_arrives_late_and_later_replies_overtake_it(vdev_socket_dir: Path) -> None:
    log = io.StringIO()
    async with behind_proxy(vdev_socket_dir, plan=on_id_reply(Delay(0.6)), fault_log=log) as setup:
        async with Client.connect(setup.proxy_path) as client:
            await enable_memory(client)
            finished: list[str] = []

            async def read_id() -> None:
                assert await hello_id(client) == HELLO_ID_VALUE
                finished.append("id")

            started = trio.current_time()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read_id)
                await setup.proxy.wait_injected()
                assert await client.region_read(CONFIG, 0, 2) == b"\x36\x1b"
                finished.append("config")
            assert finished == ["config", "id"]
            assert trio.current_time() - started >= 0.6
        await assert_still_served(setup.proxy_path)
    (line,) = log.getvalue().splitlines()
    logged = json.loads(line)
    assert logged["fault"] == "delay" and logged["seconds"] == 0.6
    assert (logged["command"], logged["message"], logged["region"], logged["offset"]) == ("REGION_READ", "reply", 0, 0)
    assert logged["time"] > 0 and logged["elapsed"] >= 0


async def test_a_dropped_reply_never_comes_and_the_stream_stays_usable(vdev_socket_dir: Path) -> None:
    device = Hello()
    async with behind_proxy(vdev_socket_dir, device, plan=on_id_reply(Drop())) as setup:
        async with Client.connect(setup.proxy_path) as client:
            await enable_memory(client)
            with trio.move_on_after(0.5) as waiting:
                await hello_id(client)
            assert waiting.cancelled_caught
            assert device.bar0["reads"] == 1  # the server did answer; the answer was lost
            assert await hello_id(client) == HELLO_ID_VALUE
        await assert_still_served(setup.proxy_path)


async def test_a_duplicated_reply_reaches_the_client_a_second_time(vdev_socket_dir: Path) -> None:
    device = Hello()
    async with behind_proxy(vdev_socket_dir, device, plan=on_id_reply(Duplicate())) as setup:
        async with Client.connect(setup.proxy_path) as client:
            await enable_memory(client)
            assert await hello_id(client) == HELLO_ID_VALUE
            with trio.fail_after(5):
                extra = await client.receive_raw()
            assert isinstance(extra, RegionReadReply) and extra.data == HELLO_ID_VALUE.to_bytes(4, "little")
            assert device.bar0["reads"] == 1
        await assert_still_served(setup.proxy_path)


async def test_a_reply_with_the_wrong_id_answers_nothing_the_client_asked(vdev_socket_dir: Path) -> None:
    async with behind_proxy(vdev_socket_dir, plan=on_id_reply(WrongId())) as setup:
        async with Client.connect(setup.proxy_path) as client:
            await enable_memory(client)
            with trio.move_on_after(0.5) as waiting:
                await hello_id(client)
            assert waiting.cancelled_caught
            stray = await client.receive_raw()
            (fault,) = setup.proxy.injected
            assert stray.msg_id == fault.detail["new_msg_id"] == fault.msg_id ^ 0x8000
        await assert_still_served(setup.proxy_path)


async def test_a_truncated_reply_is_a_protocol_error_for_the_client(vdev_socket_dir: Path) -> None:
    # Header, region access struct and 2 of the 4 data bytes.
    async with behind_proxy(vdev_socket_dir, plan=on_id_reply(Truncate(keep=34))) as setup:
        async with Client.connect(setup.proxy_path) as client:
            await enable_memory(client)
            with pytest.raises(RemoteProtocolError, match="REGION_READ announces 4 data bytes, carries 2"):
                await hello_id(client)
        await assert_still_served(setup.proxy_path)


async def test_an_oversized_reply_is_refused_by_the_clients_size_limit(vdev_socket_dir: Path) -> None:
    async with behind_proxy(vdev_socket_dir, plan=on_id_reply(Oversize())) as setup:
        async with Client.connect(setup.proxy_path) as client:
            await enable_memory(client)
            with pytest.raises(RemoteProtocolError, match="exceeds the limit") as caught:
                await hello_id(client)
            assert caught.value.errno == errno.EMSGSIZE
        await assert_still_served(setup.proxy_path)


@pytest.mark.parametrize("kind", ["eventfd", "memfd"])
async def test_unexpected_fds_arrive_with_the_reply(vdev_socket_dir: Path, kind: str) -> None:
    async with behind_proxy(vdev_socket_dir, plan=on_id_reply(ExtraFds(2, kind))) as setup:  # type: ignore[arg-type]
        async with Client.connect(setup.proxy_path) as client:
            await enable_memory(client)
            reply = await client.request(RegionReadRequest(region=0, offset=0, count=4))
            try:
                assert reply.data == HELLO_ID_VALUE.to_bytes(4, "little")
                assert [describe_fd(fd).kind for fd in reply.fds] == [kind, kind]
            finally:
                for fd in reply.fds:
                    os.close(fd)
        await assert_still_served(setup.proxy_path)


async def test_unexpected_fds_on_a_request_do_not_break_the_server(vdev_socket_dir: Path) -> None:
    plan = WireFaultPlan([FaultRule(ExtraFds(), direction=Direction.TO_SERVER, command=Command.REGION_READ, region=0)])
    async with behind_proxy(vdev_socket_dir, plan=plan) as setup:
        async with Client.connect(setup.proxy_path) as client:
            await enable_memory(client)
            with trio.fail_after(5):
                assert await hello_id(client) == HELLO_ID_VALUE  # libvfio-user closes fds it did not expect
        await assert_still_served(setup.proxy_path)


async def test_a_connection_closed_mid_message_is_a_broken_stream(vdev_socket_dir: Path) -> None:
    async with behind_proxy(vdev_socket_dir, plan=on_id_reply(Close())) as setup:
        async with Client.connect(setup.proxy_path) as client:
            await enable_memory(client)
            with pytest.raises(RemoteProtocolError, match="stream ended inside a message"):
                await hello_id(client)
        await assert_still_served(setup.proxy_path)


async def test_a_connection_closed_between_messages_is_a_disconnect(vdev_socket_dir: Path) -> None:
    async with behind_proxy(vdev_socket_dir, plan=on_id_reply(Close(after=0))) as setup:
        async with Client.connect(setup.proxy_path) as client:
            await enable_memory(client)
            with pytest.raises(ServerDisconnected):
                await hello_id(client)
        await assert_still_served(setup.proxy_path)


async def test_the_proxy_says_when_a_connection_has_ended(vdev_socket_dir: Path) -> None:
    async with behind_proxy(vdev_socket_dir, plan=on_id_reply(Close(after=0))) as setup:
        async with Client.connect(setup.proxy_path) as client:
            await enable_memory(client)
            assert setup.proxy.closed == 0
            with pytest.raises(ServerDisconnected):
                await hello_id(client)
            with trio.fail_after(10):
                await setup.proxy.wait_closed()
            assert (setup.proxy.connections, setup.proxy.closed) == (1, 1)


# --- fds pass through both ways --------------------------------------------------------------


async def test_a_region_fd_from_the_server_reaches_the_client(vdev_socket_dir: Path) -> None:
    device = MemBar(size="1M")
    transcript = io.StringIO()
    async with behind_proxy(vdev_socket_dir, device, transcript=transcript) as setup:
        async with Client.connect(setup.proxy_path) as client:
            await enable_memory(client)
            mapping = await client.map_region(0)
            mapping.write(0x100, b"through the proxy")
            assert bytes(device.bar(0).memory[0x100:0x111]) == b"through the proxy"
    (path := vdev_socket_dir / "t.jsonl").write_text(transcript.getvalue())
    infos = [r for r in load_transcript(path) if r.describe().startswith("DEVICE_GET_REGION_INFO reply")]
    # The client asks twice (the second time with room for the capabilities); the fd comes once.
    (fd,) = [fd for r in infos for fd in r.fds]
    assert fd.kind == "memfd" and fd.size is not None and fd.size >= 1 << 20


async def test_dma_memfds_and_irq_eventfds_reach_the_server(vdev_socket_dir: Path) -> None:
    device = Edu(dma_delay=0)
    async with behind_proxy(vdev_socket_dir, device) as setup:
        async with Client.connect(setup.proxy_path) as client:
            await enable_memory(client)
            (intx,) = await client.set_irqs(IrqIndex.INTX, 0, 1)
            region = await client.dma_map_memfd(0x10_0000, 0x4000)
            region.write(0x80, b"shared memory")
            for offset, value in ((0x80, 0x10_0080), (0x88, 0x40000), (0x90, 13), (0x98, 0x1 | 0x4)):
                await client.region_write(0, offset, value.to_bytes(8, "little"))
            with trio.fail_after(5):
                await intx.wait()  # the completion interrupt came through the eventfd
            assert bytes(device.dma_buffer[:13]) == b"shared memory"
            assert region.accesses == []  # the server used the memfd, not messages
