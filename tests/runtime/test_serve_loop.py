"""The C serving loop: built from the shipped source on demand, and the context lock built on it.

What a user relies on: a changed source is never served by a stale build, a
build that cannot happen says why in one line, and an interrupt fired from
Trio while the serving thread holds the context (inside ``vfu_run_ctx``, in
C) is delivered as soon as that thread lets go — never lost, never run
concurrently with the library.  A device stops at once, even while its
client is connected and silent (the loop then sleeps in a receive), or
while one of its ``async`` handlers awaits for ever (the serving thread
then waits in C for the hand-over to end).
"""

from __future__ import annotations

import faulthandler
import os
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from vdev import RO, Bar, Device, Register
from vdev.client import Client, ServerDisconnected, VfioUserError
from vdev.libvfio_user import serve_loop
from vdev.runtime.context import ContextLock, DeviceContext
from vdev_devices.hello import Hello


@pytest.fixture
def own_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private copy of the source and a private deps cache."""
    source = tmp_path / "serve_loop.c"
    source.write_text(serve_loop.SOURCE.read_text())
    monkeypatch.setattr(serve_loop, "SOURCE", source)
    monkeypatch.setenv("VDEV_DEPS_DIR", str(tmp_path / "deps"))
    return source


def test_a_changed_source_is_built_under_a_new_name(own_source: Path) -> None:
    first = serve_loop.library_path()
    serve_loop.build(first)
    assert serve_loop.ServeLoop(first).lock_size > 0
    own_source.write_text(own_source.read_text() + "\n/* changed */\n")
    second = serve_loop.library_path()
    assert second != first and not second.exists()
    serve_loop.build(second)
    assert second.exists()


def test_a_build_that_cannot_happen_says_why_in_one_line(own_source: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    own_source.write_text("this is not C\n")
    with pytest.raises(serve_loop.ServeLoopError) as failure:
        serve_loop.build(serve_loop.library_path())
    assert "\n" not in str(failure.value) and "serve_loop.c" in str(failure.value)
    assert not serve_loop.library_path().exists()
    monkeypatch.setenv("CC", "no-such-compiler")
    with pytest.raises(serve_loop.ServeLoopError, match="no C compiler 'no-such-compiler'"):
        serve_loop.build(serve_loop.library_path())


def defer_from_another_thread(lock: ContextLock, call: object) -> None:
    thread = threading.Thread(target=lock.run_or_defer, args=(call,))
    thread.start()
    thread.join()


def test_a_call_deferred_while_the_serving_loop_holds_the_context_runs_when_it_comes_back() -> None:
    lock, ran = ContextLock(), []
    lock.native.acquire()  # what the C loop does around vfu_run_ctx
    defer_from_another_thread(lock, lambda: ran.append("irq"))
    assert ran == []
    lock.native.release()  # the C loop lets go without looking at the queue...
    assert ran == []
    assert lock.native.take_attention()  # ... sees the attention flag, returns to Python
    lock.native.raise_attention()
    lock.run_deferred()
    assert ran == ["irq"]
    assert not lock.native.take_attention()


def test_a_call_deferred_while_python_holds_the_context_runs_on_release() -> None:
    lock, ran = ContextLock(), []
    with lock.held():
        lock.run_or_defer(lambda: ran.append("own"))  # the holder's own call runs at once (re-entrant)
        defer_from_another_thread(lock, lambda: ran.append("other"))
        assert ran == ["own"]
    assert ran == ["own", "other"]
    lock.run_or_defer(lambda: ran.append("free"))  # a free context runs it at once
    assert ran == ["own", "other", "free"]


@pytest.mark.requires("libvfio-user")
async def test_a_device_stops_at_once_while_its_client_is_connected_and_silent(tmp_path: Path) -> None:
    path = tmp_path / "hello.sock"
    # The receive the loop sleeps in would time out after stall_timeout; stopping must not wait for that.
    context = DeviceContext(Hello(), path, stall_timeout=600)
    stopped, server = trio.Event(), trio.CancelScope()

    async def serve_until_stopped(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with server:
            await context.serve(task_status=task_status)
        stopped.set()

    async with trio.open_nursery() as nursery:
        await nursery.start(serve_until_stopped)
        async with Client.connect(path) as client:
            await client.enable(memory=True, io=False, master=False)
            assert await client.read32(0, 0) == 0x4845_4C4F  # served: the loop now waits for the next message
            server.cancel()
            with trio.fail_after(30):
                await stopped.wait()
            assert not context.connected


def test_a_hand_over_wakes_the_other_side_and_returns_when_it_signals_back() -> None:
    loop = serve_loop.load()
    wake_fd, done_fd = os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0)
    woken = threading.Event()

    def other_side() -> None:
        while True:
            try:
                os.eventfd_read(wake_fd)
                break
            except BlockingIOError:
                continue
        woken.set()
        assert loop.wake(done_fd) == 0

    try:
        thread = threading.Thread(target=other_side)
        thread.start()
        assert loop.wake_and_wait(wake_fd, done_fd) == 0
        thread.join()
        assert woken.is_set()
        assert loop.wake_and_wait(wake_fd, -9) < 0  # a bad fd is an error, not a hang
    finally:
        os.close(wake_fd)
        os.close(done_fd)


class Gated(Device):
    """BAR0 offset 0: an ``async`` handler that answers only once the test opens its gate."""

    vendor_id = 0x1234
    device_id = 0x5678
    bar0 = Bar(4096, registers=[Register("gated", 0, width=4, access=RO)])

    def __init__(self) -> None:
        super().__init__()
        self.entered = trio.Event()
        self.gate = trio.Event()

    @bar0.on_read("gated")
    async def read_gated(self) -> int:
        self.entered.set()
        await self.gate.wait()
        return 0x600D


@asynccontextmanager
async def serving(context: DeviceContext) -> AsyncIterator[trio.CancelScope]:
    """Serve ``context`` until the scope yielded is cancelled and the context has stopped.

    Stopping waits for the serving thread shielded from cancellation, so a
    thread that is never woken would hang the test rather than fail it: a
    watchdog ends the run instead.
    """
    server = trio.CancelScope()

    async def serve(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with server:
            await context.serve(task_status=task_status)

    faulthandler.dump_traceback_later(60, exit=True)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve)
            yield server
    finally:
        faulthandler.cancel_dump_traceback_later()


@pytest.mark.requires("libvfio-user")
async def test_a_device_stops_at_once_while_an_async_handler_of_it_awaits(tmp_path: Path) -> None:
    device = Gated()
    context = DeviceContext(device, tmp_path / "gated.sock", stall_timeout=600)

    async def read_gated(client: Client) -> None:
        with pytest.raises((VfioUserError, ServerDisconnected)):  # an answer, not a hang
            await client.read32(0, 0)

    async with serving(context) as server, Client.connect(context.socket_path) as client, trio.open_nursery() as reads:
        await client.enable(memory=True, io=False, master=False)
        reads.start_soon(read_gated, client)
        await device.entered.wait()  # the serving thread now waits for the hand-over
        server.cancel()


@pytest.mark.requires("libvfio-user")
async def test_a_leftover_wake_up_never_ends_a_hand_over_before_its_handler_has(tmp_path: Path) -> None:
    """A hand-over that gave up leaves its job's signal behind; the next one must not take it for its own."""
    device = Gated()
    context = DeviceContext(device, tmp_path / "gated.sock")
    values: list[int] = []

    async def read_gated(client: Client) -> None:
        values.append(await client.read32(0, 0))

    async with serving(context) as server, Client.connect(context.socket_path) as client:
        await client.enable(memory=True, io=False, master=False)
        os.eventfd_write(context._done_fd, 1)  # what a hand-over that gave up would have left
        async with trio.open_nursery() as reads:
            reads.start_soon(read_gated, client)
            await device.entered.wait()
            device.gate.set()
        server.cancel()
    assert values == [0x600D]
