"""Client behaviour a well-behaved C server never provokes, against a scripted peer.

The peer is built from ``vdev.protocol.Connection`` over a real UNIX socket, so
each test says exactly what the server sends and checks what comes back.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from vdev.client import Client, ServerDisconnected, VfioUserError
from vdev.protocol import (
    NEED_DATA,
    Capabilities,
    Connection,
    ConnectionClosed,
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
    Message,
    RawRequest,
    RegionReadReply,
    RegionReadRequest,
    RemoteProtocolError,
    VersionReply,
    VersionRequest,
)
from vdev.transport import FdStream


class ScriptedServer:
    """The server end of one connection, stepped by the test."""

    def __init__(self, stream: FdStream) -> None:
        self.stream = stream
        self.conn = Connection()

    async def receive(self) -> Message:
        while (event := self.conn.next_event()) is NEED_DATA:
            self.conn.receive_data(*await self.stream.receive())
        assert not isinstance(event, ConnectionClosed), "the client hung up"
        return event

    async def send(self, message: Message) -> None:
        await self.stream.send(*self.conn.send(message))


class Listener:
    def __init__(self, path: Path, sock: trio.socket.SocketType) -> None:
        self.path = path
        self.sock = sock

    async def accept(self) -> ScriptedServer:
        conn, _ = await self.sock.accept()
        return ScriptedServer(FdStream(conn))


async def accept_map(server: ScriptedServer) -> DmaMapRequest:
    """Answer one DMA_MAP with success, closing the memfd it may carry."""
    request = await server.receive()
    assert isinstance(request, DmaMapRequest)
    for fd in request.fds:
        os.close(fd)
    await server.send(DmaMapReply(msg_id=request.msg_id))
    return request


@pytest.fixture
async def listener() -> AsyncIterator[Listener]:
    with tempfile.TemporaryDirectory(prefix="vdev-", dir="/tmp") as directory:
        path = Path(directory) / "sock"
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        await sock.bind(str(path))
        sock.listen(1)
        try:
            yield Listener(path, sock)
        finally:
            sock.close()


async def test_negotiation_checks_the_answered_version(listener: Listener) -> None:
    async with Client.connect(listener.path, negotiate=False) as client:
        server = await listener.accept()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.negotiate)
            request = await server.receive()
            assert isinstance(request, VersionRequest)
            assert (request.major, request.minor) == (0, 1)
            assert request.capabilities == Capabilities(max_msg_fds=16, max_data_xfer_size=1 << 20)
            nursery.cancel_scope.cancel()

    async with Client.connect(listener.path, negotiate=False) as client:
        server = await listener.accept()

        async def answer() -> None:
            request = await server.receive()
            await server.send(VersionReply(msg_id=request.msg_id, major=1, minor=0))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(answer)
            with pytest.raises(RemoteProtocolError, match="answered version 1.0"):
                await client.negotiate()


async def test_replies_are_matched_by_message_id_not_order(listener: Listener) -> None:
    async with Client.connect(listener.path, negotiate=False) as client:
        server = await listener.accept()
        results: dict[str, object] = {}

        async def ask_info() -> None:
            results["info"] = await client.device_info()

        async def ask_read() -> None:
            results["read"] = await client.region_read(0, 0, 2)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask_info)
            first = await server.receive()
            nursery.start_soon(ask_read)
            second = await server.receive()
            assert isinstance(first, DeviceInfoRequest)
            assert isinstance(second, RegionReadRequest)
            assert first.msg_id != second.msg_id
            await server.send(RegionReadReply(msg_id=second.msg_id, region=0, offset=0, data=b"hi"))
            await server.send(
                DeviceInfoReply(msg_id=first.msg_id, flags=0, num_regions=1, num_irqs=0)
            )
        assert results["read"] == b"hi"
        assert results["info"].num_regions == 1


async def test_dma_requests_are_served_while_a_call_waits(listener: Listener) -> None:
    async with Client.connect(listener.path, negotiate=False) as client:
        server = await listener.accept()
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
            assert await server.receive() == DmaReadReply(
                msg_id=101, address=0x400E, data=b"\0\0written"
            )
            await server.send(DmaReadRequest(msg_id=102, address=0x4FFF, count=2))
            outside = await server.receive()
            assert isinstance(outside, ErrorReply) and outside.errno == errno.EFAULT
            await server.send(DmaWriteRequest(msg_id=103, address=0x4000, data=b"x", no_reply=True))
            assert not reset_done.is_set()
            await server.send(DeviceResetReply(msg_id=reset_request.msg_id))
        assert region.read(0, 1) == b"x"
        assert [(a.kind, a.offset, a.size) for a in region.accesses] == [
            ("write", 0x10, 7),
            ("read", 0xE, 9),
            ("write", 0, 1),
        ]


async def test_dma_respects_the_mapping_permissions(listener: Listener) -> None:
    async with Client.connect(listener.path, negotiate=False) as client:
        server = await listener.accept()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(accept_map, server)
            await client.dma_map_memfd(0, 0x1000, flags=DmaFlag.READ)
        await server.send(DmaWriteRequest(msg_id=7, address=0, data=b"no"))
        refused = await server.receive()
        assert isinstance(refused, ErrorReply) and refused.errno == errno.EPERM


async def test_server_requests_the_client_does_not_serve_get_einval(listener: Listener) -> None:
    async with Client.connect(listener.path, negotiate=False) as client:
        server = await listener.accept()
        await server.send(RawRequest(msg_id=9, command=200, payload=b"?"))
        reply = await server.receive()
        assert reply == ErrorReply(msg_id=9, command=200, errno=errno.EINVAL)
        await server.send(DeviceInfoRequest(msg_id=10))
        reply = await server.receive()
        assert isinstance(reply, ErrorReply) and reply.msg_id == 10
        assert client.server_version is None


async def test_a_reply_of_the_wrong_kind_is_a_protocol_error(listener: Listener) -> None:
    async with Client.connect(listener.path, negotiate=False) as client:
        server = await listener.accept()

        async def answer_wrongly() -> None:
            request = await server.receive()
            await server.send(DmaUnmapReply(msg_id=request.msg_id, address=0, size=0))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(answer_wrongly)
            with pytest.raises(RemoteProtocolError, match="DmaUnmapReply"):
                await client.device_reset()


async def test_a_late_reply_to_an_abandoned_call_is_dropped(listener: Listener) -> None:
    async with Client.connect(listener.path, negotiate=False) as client:
        server = await listener.accept()
        with trio.move_on_after(0.05):
            await client.device_reset()
        late = await server.receive()
        await server.send(DeviceResetReply(msg_id=late.msg_id))
        await server.send(ErrorReply(msg_id=0x4242, command=13, errno=errno.EIO))
        # The abandoned reply vanishes; the stray one is left for receive_raw.
        assert await client.receive_raw() == ErrorReply(msg_id=0x4242, command=13, errno=5)


async def test_garbage_from_the_server_fails_every_waiter(listener: Listener) -> None:
    async with Client.connect(listener.path, negotiate=False) as client:
        server = await listener.accept()

        async def send_garbage() -> None:
            await server.receive()
            await server.stream.send(b"\x00\x00\x01\x00\x04\x00\x00\x00" + bytes(8))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_garbage)
            with pytest.raises(RemoteProtocolError) as caught:
                await client.device_info()
        assert caught.value.errno == errno.EINVAL
        with pytest.raises(RemoteProtocolError):
            await client.device_info()
        with pytest.raises(RemoteProtocolError):
            await client.receive_raw()


async def test_a_hang_up_mid_call_is_server_disconnected(listener: Listener) -> None:
    async with Client.connect(listener.path, negotiate=False) as client:
        server = await listener.accept()

        async def hang_up() -> None:
            await server.receive()
            server.stream.close()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(hang_up)
            with pytest.raises(ServerDisconnected):
                await client.device_info()
        with pytest.raises(ServerDisconnected):
            await client.region_write(0, 0, b"late")


async def test_error_replies_raise_with_their_errno(listener: Listener) -> None:
    async with Client.connect(listener.path, negotiate=False) as client:
        server = await listener.accept()

        async def refuse() -> None:
            request = await server.receive()
            await server.send(ErrorReply(msg_id=request.msg_id, command=request.command, errno=0))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(refuse)
            with pytest.raises(VfioUserError, match="no reason given") as caught:
                await client.request(DmaUnmapRequest(address=0, size=1))
        assert caught.value.errno == 0


async def test_closing_releases_everything_and_refuses_calls(listener: Listener) -> None:
    async with Client.connect(listener.path, negotiate=False) as client:
        server = await listener.accept()
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
        assert await server.stream.receive() == (b"", ())


async def test_transfers_beyond_the_servers_limit_are_refused_locally(
    listener: Listener,
) -> None:
    async with Client.connect(listener.path, negotiate=False) as client:
        await listener.accept()
        with pytest.raises(ValueError, match="max_data_xfer_size"):
            await client.region_read(0, 0, (1 << 20) + 1)
