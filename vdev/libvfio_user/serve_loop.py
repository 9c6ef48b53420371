"""vdev's serving loop in C (``serve_loop.c``), built on first use and called through ctypes.

Each device's serving thread waits for a message and hands it to
``vfu_run_ctx`` many thousand times a second; done from Python, that loop
cost about as much as the library's own work per message.  In C it costs
nothing beyond the blocking receive that wakes it, and the thread returns
to Python only when something needs deciding (see :class:`ServeStatus`).
Why it waits in a receive and not in ``poll(2)`` is told in the source.

The source ships with the package and is compiled with the system's C
compiler (``$CC``, else ``cc``) into the deps cache, under a name carrying
the source's hash, so a changed source is never served by a stale build.
``make deps`` builds it ahead of time; any later process finds it there.
"""

from __future__ import annotations

import ctypes
import enum
import functools
import hashlib
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from vdev import deps

SOURCE = Path(__file__).with_name("serve_loop.c")


class ServeStatus(enum.IntEnum):
    """Why :meth:`ServeLoop.serve` returned, when it is not ``-errno`` from ``vfu_run_ctx``."""

    #: A SET_IRQS was served while the caller watched for one.
    SET_IRQS = 2
    #: Another thread raised the lock's attention flag (to stop the thread, or for a call it deferred).
    ATTENTION = 3


class ServeLoopError(RuntimeError):
    """The serving loop could not be built or loaded."""


def library_path() -> Path:
    """Where the build of the current source lives in the deps cache."""
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]
    return deps.cache_dir() / "serve-loop" / f"libvdev-serve-loop-{digest}.so"


def build(path: Path) -> None:
    """Compile the source to ``path``; atomic, so processes building at once do no harm."""
    compiler = os.environ.get("CC", "cc")
    if shutil.which(compiler) is None:
        raise ServeLoopError(f"cannot build vdev's serving loop: no C compiler {compiler!r} (install gcc, or set CC)")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    command = [compiler, "-O2", "-shared", "-fPIC", "-Wall", "-Werror", "-o", str(partial), str(SOURCE), "-pthread"]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        partial.unlink(missing_ok=True)
        first_line = (result.stderr.strip().splitlines() or ["no output"])[0]
        raise ServeLoopError(f"cannot build vdev's serving loop ({' '.join(command)}): {first_line}")
    os.replace(partial, path)


class ServeLoop:
    """The loaded library, its prototypes declared."""

    def __init__(self, path: Path) -> None:
        cdll = ctypes.CDLL(str(path))
        lock_p, fd = ctypes.c_void_p, ctypes.c_int
        declarations: dict[str, tuple[type | None, list[type]]] = {
            "vdev_lock_size": (ctypes.c_size_t, []),
            "vdev_lock_init": (ctypes.c_int, [lock_p]),
            "vdev_lock_acquire": (None, [lock_p]),
            "vdev_lock_try": (ctypes.c_bool, [lock_p]),
            "vdev_lock_release": (None, [lock_p]),
            "vdev_lock_raise_attention": (None, [lock_p]),
            "vdev_lock_take_attention": (ctypes.c_bool, [lock_p]),
            "vdev_serve": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_void_p, fd, lock_p, ctypes.c_int]),
            "vdev_wake": (ctypes.c_int, [fd]),
            "vdev_wake_and_wait": (ctypes.c_int, [fd, fd]),
        }
        for name, (restype, argtypes) in declarations.items():
            function = getattr(cdll, name)
            function.restype, function.argtypes = restype, argtypes
        self.cdll = cdll
        self.lock_size: int = cdll.vdev_lock_size()
        #: ``serve(vfu_run_ctx, ctx, connection_fd, lock address, watch_set_irqs)``: a
        #: :class:`ServeStatus` or ``-errno``; the loop itself is documented in ``serve_loop.c``.
        self.serve: Callable[[int, int, int, int, bool], int] = cdll.vdev_serve
        #: ``wake(eventfd)``: add one to it, the interpreter's lock let go; 0 or ``-errno``.
        self.wake: Callable[[int], int] = cdll.vdev_wake
        #: ``wake_and_wait(wake_fd, done_fd)``: wake ``wake_fd`` (if not negative), then block
        #: until the blocking eventfd ``done_fd`` is signalled; 0 or ``-errno``.
        self.wake_and_wait: Callable[[int, int], int] = cdll.vdev_wake_and_wait


_loaded: ServeLoop | None = None


def load() -> ServeLoop:
    """The serving loop for this process, built first if the cache has no build of this source."""
    global _loaded
    if _loaded is None:
        path = library_path()
        if not path.exists():
            try:
                build(path)
            except OSError as exc:
                raise ServeLoopError(f"cannot build vdev's serving loop into {path.parent}: {exc}") from None
        _loaded = ServeLoop(path)
    return _loaded


class NativeLock:
    """A recursive mutex with an attention flag, in memory this object owns (see ``serve_loop.c``).

    ``acquire`` blocks with the GIL released (ctypes drops it for every
    call), so a thread waiting here never stops the holder from running
    Python.
    """

    def __init__(self, loop: ServeLoop | None = None) -> None:
        loop = loop or load()
        self._memory = ctypes.create_string_buffer(loop.lock_size)
        self.address = ctypes.addressof(self._memory)
        if loop.cdll.vdev_lock_init(self.address) < 0:
            raise ServeLoopError("cannot initialise a lock")
        cdll, address = loop.cdll, self.address
        self.acquire: Callable[[], None] = functools.partial(cdll.vdev_lock_acquire, address)
        self.try_acquire: Callable[[], bool] = functools.partial(cdll.vdev_lock_try, address)
        self.release: Callable[[], None] = functools.partial(cdll.vdev_lock_release, address)
        #: Make the serving loop return to Python after its current message.
        self.raise_attention: Callable[[], None] = functools.partial(cdll.vdev_lock_raise_attention, address)
        #: Whether attention was raised since the last call (the flag is lowered).
        self.take_attention: Callable[[], bool] = functools.partial(cdll.vdev_lock_take_attention, address)


if __name__ == "__main__":  # `make deps` builds it ahead of time
    try:
        load()
    except ServeLoopError as exc:
        raise SystemExit(str(exc)) from None
    print(library_path())
