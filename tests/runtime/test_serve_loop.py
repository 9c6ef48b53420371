"""The C serving loop: built from the shipped source on demand, and the context lock built on it.

What a user relies on: a changed source is never served by a stale build, a
build that cannot happen says why in one line, and an interrupt fired from
Trio while the serving thread holds the context (inside ``vfu_run_ctx``, in
C) is delivered as soon as that thread lets go — never lost, never run
concurrently with the library.  And a device stops at once, even while its
client is connected and silent (the loop then sleeps in a receive).
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import trio

from vdev.client import Client
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
