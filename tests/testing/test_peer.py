"""The scripted peer's own promises: typed expectations, clear failures, the handshake, fds, hang-ups."""

from __future__ import annotations

import os

import pytest
import trio

from vdev.client import Client
from vdev.protocol import (
    Capabilities,
    DeviceInfoRequest,
    DeviceResetReply,
    DeviceResetRequest,
    DmaMapReply,
    DmaMapRequest,
)
from vdev.testing import ScriptedServer, UnexpectedMessage


async def test_negotiate_answers_the_clients_version_with_the_scripted_capabilities(
    vdev_scripted_server: ScriptedServer,
) -> None:
    async with trio.open_nursery() as nursery:
        proposals = []

        async def serve() -> None:
            peer = await vdev_scripted_server.accept()
            proposals.append(await peer.negotiate(capabilities=Capabilities(max_msg_fds=3)))
            request = await peer.expect(DeviceResetRequest)
            await peer.send(DeviceResetReply(msg_id=request.msg_id))

        nursery.start_soon(serve)
        async with Client.connect(vdev_scripted_server.path) as client:
            assert client.server_version == (0, 1)
            assert client.server_capabilities.max_msg_fds == 3
            await client.device_reset()
    assert (proposals[0].major, proposals[0].minor) == (0, 1)


async def test_expect_names_what_came_instead(vdev_scripted_server: ScriptedServer) -> None:
    async with Client.connect(vdev_scripted_server.path, negotiate=False) as client:
        peer = await vdev_scripted_server.accept()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.device_info)
            with pytest.raises(UnexpectedMessage, match="expected DmaMapRequest, the client sent DeviceInfoRequest"):
                await peer.expect(DmaMapRequest)
            nursery.cancel_scope.cancel()


async def test_fds_arrive_with_their_message_and_are_the_tests(vdev_scripted_server: ScriptedServer) -> None:
    async with Client.connect(vdev_scripted_server.path, negotiate=False) as client:
        peer = await vdev_scripted_server.accept()
        received: list[DmaMapRequest] = []

        async def answer() -> None:
            received.append(await peer.expect(DmaMapRequest))
            await peer.send(DmaMapReply(msg_id=received[0].msg_id))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(answer)
            region = await client.dma_map_memfd(0, 0x1000)
        region.write(0x10, b"hello")
        (memfd,) = received[0].fds
        try:
            assert os.pread(memfd, 5, 0x10) == b"hello"  # the server's view of the client's memory
        finally:
            os.close(memfd)


async def test_a_hang_up_is_expected_or_unexpected(vdev_scripted_server: ScriptedServer) -> None:
    async with Client.connect(vdev_scripted_server.path, negotiate=False) as client:
        peer = await vdev_scripted_server.accept()
        await client.aclose()
        with pytest.raises(UnexpectedMessage, match="hung up"):
            await peer.receive()
    async with Client.connect(vdev_scripted_server.path, negotiate=False) as client:
        peer = await vdev_scripted_server.accept()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.device_info)
            with pytest.raises(UnexpectedMessage, match="expected the client to hang up, it sent DeviceInfoRequest"):
                await peer.expect_hang_up()
            nursery.cancel_scope.cancel()
        await client.aclose()
        with pytest.raises(UnexpectedMessage):
            await peer.expect(DeviceInfoRequest)
