"""Starting ``vdev`` with a listening socket its parent created, as fd 3 (``--fd 3`` or socket activation).

The parent binds and listens, then starts the server with the socket as fd 3,
as systemd does: fork, move the socket to fd 3, set ``LISTEN_PID`` to the
child's pid, exec.  Clients can connect at once: the kernel queues them on
the listening socket until the server accepts, so nothing waits for the
server to be ready.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

#: What the parent runs in its child: the socket to fd 3, then exec.  ACTIVATION is
#: empty, or "FDS PID" for LISTEN_FDS and LISTEN_PID ("self": the child's own pid).
LAUNCH = """
import os, sys
fd, activation, *command = sys.argv[1:]
os.dup2(int(fd), 3)
if activation:
    fds, pid = activation.split()
    os.environ.update(LISTEN_FDS=fds, LISTEN_PID=str(os.getpid()) if pid == "self" else pid)
os.execv(sys.executable, [sys.executable, "-m", "vdev", *command])
"""
ACTIVATE = "1 self"


@contextmanager
def listening(path: Path) -> Iterator[socket.socket]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen()
        yield listener


def start(
    listener: socket.socket, activation: str, *args: str, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    """``vdev ARGS`` with ``listener`` as its fd 3, and LISTEN_* as ``activation`` says (see LAUNCH)."""
    fd = listener.fileno()
    return subprocess.Popen(
        [sys.executable, "-c", LAUNCH, str(fd), activation, *args],
        pass_fds=[fd],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def run(fd: int, activation: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", LAUNCH, str(fd), activation, *args],
        pass_fds=[fd],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def finish(server: subprocess.Popen[str], *, stop: bool = False) -> tuple[int, str]:
    """Wait for ``server`` to exit (after SIGTERM if ``stop``); its status and stderr."""
    if stop:
        server.send_signal(signal.SIGTERM)
    try:
        _, stderr = server.communicate(timeout=60)
    finally:
        if server.poll() is None:
            server.kill()
    return server.returncode, stderr
