"""QTestClient's framing and bookkeeping against a scripted QEMU end, in memory.

These cover what a real QEMU produces only by chance: replies split across
reads, IRQ lines between a command and its reply, a pulse shorter than a
waiter's wake-up, a stream closing mid-command, a cancelled command.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from vdev.qemu import QTestClient, QTestClosedError, QTestError

HANG_GUARD = 10


class FakeQemu:
    """The QEMU end of a qtest stream, driven by the test."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self._buffer = b""

    async def command(self) -> str:
        """The next command line the client sent."""
        while b"\n" not in self._buffer:
            chunk = await self.stream.receive_some()
            assert chunk, "client closed the stream"
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode()

    async def send(self, text: str) -> None:
        await self.stream.send_all(text.encode())


@asynccontextmanager
async def connected() -> AsyncIterator[tuple[QTestClient, FakeQemu]]:
    client_end, qemu_end = trio.testing.memory_stream_pair()
    qtest = QTestClient(client_end)
    # Not a timing assertion: a bookkeeping bug shows up as a hang otherwise.
    with trio.fail_after(HANG_GUARD):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(qtest.run)
            yield qtest, FakeQemu(qemu_end)
            nursery.cancel_scope.cancel()


async def test_irq_lines_between_command_and_reply_are_routed() -> None:
    async with connected() as (qtest, qemu):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(qtest.readl, 0x10)
            assert await qemu.command() == "readl 0x10"
            await qemu.send("IRQ raise 5\nOK 0x000000000000002a\n")
        assert qtest.get_irq(5)
        assert not qtest.get_irq(4)


async def test_reply_split_across_reads_is_reassembled() -> None:
    async with connected() as (qtest, qemu):
        result = []

        async def read() -> None:
            result.append(await qtest.readq(0x20))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            await qemu.command()
            await qemu.send("OK 0x11223344")
            await trio.testing.wait_all_tasks_blocked()
            await qemu.send("55667788\n")
        assert result == [0x1122334455667788]


async def test_wait_irq_returns_after_a_pulse() -> None:
    async with connected() as (qtest, qemu):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(qtest.wait_irq, 3)
            await trio.testing.wait_all_tasks_blocked()
            await qemu.send("IRQ raise 3\nIRQ lower 3\n")
        assert not qtest.get_irq(3)


async def test_fail_reply_raises_with_the_reply() -> None:
    async with connected() as (qtest, qemu):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(qemu.send, "FAIL Unknown device\n")
            with pytest.raises(QTestError) as caught:
                await qtest.irq_intercept_in("nowhere")
        assert caught.value.command == "irq_intercept_in nowhere"
        assert caught.value.reply == "FAIL Unknown device"


async def test_stream_end_fails_pending_command_and_irq_waits() -> None:
    async with connected() as (qtest, qemu):
        async with trio.open_nursery() as nursery:

            async def close_after_command() -> None:
                await qemu.command()
                await qemu.stream.aclose()

            nursery.start_soon(close_after_command)
            with pytest.raises(QTestClosedError):
                await qtest.inb(0x60)
        with pytest.raises(QTestClosedError):
            await qtest.wait_irq(1)
        assert qtest.peer_closed


async def test_reply_to_a_cancelled_command_is_discarded() -> None:
    async with connected() as (qtest, qemu):
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:

                async def cancel_once_sent() -> None:
                    assert await qemu.command() == "readl 0x1"
                    scope.cancel()

                nursery.start_soon(cancel_once_sent)
                await qtest.readl(0x1)
        assert scope.cancelled_caught
        await qemu.send("OK 0x1\n")  # QEMU still answers the abandoned command
        result = []

        async def read() -> None:
            result.append(await qtest.readl(0x2))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            assert await qemu.command() == "readl 0x2"
            await qemu.send("OK 0x2\n")
        assert result == [2]


async def test_values_are_checked_before_anything_is_sent() -> None:
    async with connected() as (qtest, qemu):
        with pytest.raises(ValueError):
            await qtest.writeb(0x1000, 0x100)
        with pytest.raises(ValueError):
            await qtest.outl(0x1_0000, 0)
        with pytest.raises(ValueError):
            await qtest.irq_intercept_in("two words")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(qtest.outb, 0x80, 1)
            assert await qemu.command() == "outb 0x80 0x1"
            await qemu.send("OK\n")
