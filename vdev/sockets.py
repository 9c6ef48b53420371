"""Socket paths a server listens on: never clobber a file or a live server's socket.

``vdev serve`` and ``vdev proxy`` both create a listening UNIX socket at a
path the user gives.  A leftover socket that nobody listens on is removed;
a live one, or a path that is not a socket, is refused, because replacing a
live server's socket leaves that server running and unreachable.
"""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

#: The longest path a UNIX socket address holds on Linux (``sun_path`` less its NUL).
MAX_PATH_BYTES = 107


class SocketPathError(Exception):
    """A path no server should listen on: missing directory, a file, a live server, too long."""


def prepare_socket_path(path: str | os.PathLike[str]) -> None:
    """Make ``path`` free for a new listening socket, or explain in one line why it cannot be."""
    path = Path(path)
    if len(os.fsencode(path)) > MAX_PATH_BYTES:
        raise SocketPathError(f"{path} is {len(os.fsencode(path))} bytes; a UNIX socket path holds {MAX_PATH_BYTES}")
    if not path.parent.is_dir():
        raise SocketPathError(f"cannot listen on {path}: directory {path.parent} does not exist")
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise SocketPathError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(os.fspath(path))
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)
        return
    finally:
        probe.close()
    raise SocketPathError(f"{path} belongs to a server that is still running")


def same_socket(first: str | os.PathLike[str], second: str | os.PathLike[str]) -> bool:
    """Whether two socket paths name the same place (symlinks and ``..`` resolved)."""
    return Path(first).resolve() == Path(second).resolve()
