"""Client behaviour a well-behaved C server never provokes, against a scripted peer.

The peer is :class:`vdev.testing.ScriptedServer` (the ``vdev_scripted_server``
fixture): a real UNIX socket, so each test says exactly what the server
sends and checks what comes back.
"""

from __future__ import annotations

import errno
import os

import pytest
import trio

from vdev.client import Client, ServerDisconnected, VfioUserError
from vdev.protocol import (
    Capabilities,
    DeviceInfoReply,
    DeviceInfoRequest,
    DeviceResetReply,
    DmaFlag,
    DmaMapReply,
    DmaMapRequest,
    DmaReadReply,
    DmaReadRequest,
    DmaUnmapReply,
    DmaUnmapRequest,
    DmaWriteReply,
    DmaWriteRequest,
    ErrorReply,
    RawRequest,
    RegionReadReply,
    RegionReadRequest,
    RemoteProtocolError,
    VersionReply,
    VersionRequest,
)
from vdev.testing import ScriptedConnection, ScriptedServer


async def accept_map(peer: ScriptedConnection) -> DmaMapRequest:
    """Answer one DMA_MAP with success, closing the memfd it may carry."""
    request = await peer.expect(DmaMapRequest)
    for fd in request.fds:
        os.close(fd)
    await peer.send(DmaMapReply(msg_id=request.msg_id))
    return request


async def test_negotiation_checks_the_answered_version(vdev_scripted_server: ScriptedServer) -> None:
    async with Client.connect(vdev_scripted_server.path, negotiate=False) as client:
        server = await vdev_scripted_server.accept()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.negotiate)
            request = await server.expect(VersionRequest)
            assert (request.major, request.minor) == (0, 1)
            assert request.capabilities == Capabilities(max_msg_fds=16, max_data_xfer_size=1 << 20)
            nursery.cancel_scope.cancel()

    async with Client.connect(vdev_scripted_server.path, negotiate=False) as client:
        server = await vdev_scripted_server.accept()

        async def answer() -> None:
            request = await server.receive()
            await server.send(VersionReply(msg_id=request.msg_id, major=1, minor=0))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(answer)
            with pytest.raises(RemoteProtocolError, match="answered version 1.0"):
                await client.negotiate()


async def test_replies_are_matched_by_message_id_not_order(vdev_scripted_server: ScriptedServer) -> None:
    async with Client.connect(vdev_scripted_server.path, negotiate=False) as client:
        server = await vdev_scripted_server.accept()
        results: dict[str, object] = {}

        async def ask_info() -> None:
            results["info"] = await client.device_info()

        async def ask_read() -> None:
            results["read"] = await client.region_read(0, 0, 2)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask_info)
            first = await server.expect(DeviceInfoRequest)
            nursery.start_soon(ask_read)
            second = await server.expect(RegionReadRequest)
            assert first.msg_id != second.msg_id
            await server.send(RegionReadReply(msg_id=second.msg_id, region=0, offset=0, data=b"hi"))
            await server.send(DeviceInfoReply(msg_id=first.msg_id, flags=0, num_regions=1, num_irqs=0))
        assert results["read"] == b"hi"
        assert results["info"].num_regions == 1


async def test_dma_requests_are_served_while_a_call_waits(vdev_scripted_server: ScriptedServer) -> None:
    async with Client.connect(vdev_scripted_server.path, negotiate=False) as client:
        server = await vdev_scripted_server.accept()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(accept_map, server)
            region = await client.dma_map_private(0x4000, 0x1000)

        reset_done = trio.Event()

        async def reset() -> None:
            await client.device_reset()
            reset_done.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reset)
            reset_request = await server.receive()
            # Before answering, the "device" does DMA both ways, and one bad access.
            await server.send(DmaWriteRequest(msg_id=100, address=0x4010, data=b"written"))
            assert await server.receive() == DmaWriteReply(msg_id=100, address=0x4010, count=7)
            await server.send(DmaReadRequest(msg_id=101, address=0x400E, count=9))
            assert await server.receive() == DmaReadReply(msg_id=101, address=0x400E, data=b"\0\0written")
            await server.send(DmaReadRequest(msg_id=102, address=0x4FFF, count=2))
            outside = await server.expect(ErrorReply)
            assert outside.errno == errno.EFAULT
            await server.send(DmaWriteRequest(msg_id=103, address=0x4000, data=b"x", no_reply=True))
            assert not reset_done.is_set()
            await server.send(DeviceResetReply(msg_id=reset_request.msg_id))
        assert region.read(0, 1) == b"x"
        assert [(a.kind, a.offset, a.size) for a in region.accesses] == [
            ("write", 0x10, 7),
            ("read", 0xE, 9),
            ("write", 0, 1),
        ]


async def test_dma_respects_the_mapping_permissions(vdev_scripted_server: ScriptedServer) -> None:
    async with Client.connect(vdev_scripted_server.path, negotiate=False) as client:
        server = await vdev_scripted_server.accept()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(accept_map, server)
            await client.dma_map_memfd(0, 0x1000, flags=DmaFlag.READ)
        await server.send(DmaWriteRequest(msg_id=7, address=0, data=b"no"))
        refused = await server.expect(ErrorReply)
        assert refused.errno == errno.EPERM


async def test_server_requests_the_client_does_not_serve_get_einval(vdev_scripted_server: ScriptedServer) -> None:
    async with Client.connect(vdev_scripted_server.path, negotiate=False) as client:
        server = await vdev_scripted_server.accept()
        await server.send(RawRequest(msg_id=9, command=200, payload=b"?"))
        reply = await server.receive()
        assert reply == ErrorReply(msg_id=9, command=200, errno=errno.EINVAL)
        await server.send(DeviceInfoRequest(msg_id=10))
        reply = await server.expect(ErrorReply)
        assert reply.msg_id == 10
        assert client.server_version is None


async def test_a_reply_of_the_wrong_kind_is_a_protocol_error(vdev_scripted_server: ScriptedServer) -> None:
    async with Client.connect(vdev_scripted_server.path, negotiate=False) as client:
        server = await vdev_scripted_server.accept()

        async def answer_wrongly() -> None:
            request = await server.receive()
            await server.send(DmaUnmapReply(msg_id=request.msg_id, address=0, size=0))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(answer_wrongly)
            with pytest.raises(RemoteProtocolError, match="DmaUnmapReply"):
                await client.device_reset()


async def test_a_late_reply_to_an_abandoned_call_is_dropped(vdev_scripted_server: ScriptedServer) -> None:
    async with Client.connect(vdev_scripted_server.path, negotiate=False) as client:
        server = await vdev_scripted_server.accept()
        with trio.move_on_after(0.05):
            await client.device_reset()
        late = await server.receive()
        await server.send(DeviceResetReply(msg_id=late.msg_id))
        await server.send(ErrorReply(msg_id=0x4242, command=13, errno=errno.EIO))
        # The abandoned reply vanishes; the stray one is left for receive_raw.
        assert await client.receive_raw() == ErrorReply(msg_id=0x4242, command=13, errno=5)


async def test_garbage_from_the_server_fails_every_waiter(vdev_scripted_server: ScriptedServer) -> None:
    async with Client.connect(vdev_scripted_server.path, negotiate=False) as client:
        server = await vdev_scripted_server.accept()

        async def send_garbage() -> None:
            await server.receive()
            await server.send_raw(b"\x00\x00\x01\x00\x04\x00\x00\x00" + bytes(8))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_garbage)
            with pytest.raises(RemoteProtocolError) as caught:
                await client.device_info()
        assert caught.value.errno == errno.EINVAL
        with pytest.raises(RemoteProtocolError):
            await client.device_info()
        with pytest.raises(RemoteProtocolError):
            await client.receive_raw()


async def test_a_hang_up_mid_call_is_server_disconnected(vdev_scripted_server: ScriptedServer) -> None:
    async with Client.connect(vdev_scripted_server.path, negotiate=False) as client:
        server = await vdev_scripted_server.accept()

        async def hang_up() -> None:
            await server.receive()
            server.close()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(hang_up)
            with pytest.raises(ServerDisconnected):
                await client.device_info()
        with pytest.raises(ServerDisconnected):
            await client.region_write(0, 0, b"late")


async def test_error_replies_raise_with_their_errno(vdev_scripted_server: ScriptedServer) -> None:
    async with Client.connect(vdev_scripted_server.path, negotiate=False) as client:
        server = await vdev_scripted_server.accept()

        async def refuse() -> None:
            request = await server.receive()
            await server.send(ErrorReply(msg_id=request.msg_id, command=request.command, errno=0))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(refuse)
            with pytest.raises(VfioUserError, match="no reason given") as caught:
                await client.request(DmaUnmapRequest(address=0, size=1))
        assert caught.value.errno == 0


async def test_closing_releases_everything_and_refuses_calls(vdev_scripted_server: ScriptedServer) -> None:
    async with Client.connect(vdev_scripted_server.path, negotiate=False) as client:
        server = await vdev_scripted_server.accept()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(accept_map, server)
            region = await client.dma_map_memfd(0, 0x1000)
        memfd = region.fd
        assert memfd is not None
        await client.aclose()
        assert region.fd is None
        with pytest.raises(OSError):
            os.fstat(memfd)
        with pytest.raises(trio.ClosedResourceError):
            await client.device_info()
        await server.expect_hang_up()


async def test_transfers_beyond_the_servers_limit_are_refused_locally(
    vdev_scripted_server: ScriptedServer,
) -> None:
    async with Client.connect(vdev_scripted_server.path, negotiate=False) as client:
        await vdev_scripted_server.accept()
        with pytest.raises(ValueError, match="max_data_xfer_size"):
            await client.region_read(0, 0, (1 << 20) + 1)
