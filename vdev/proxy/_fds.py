"""What a passed file descriptor is, and how to make another one like it.

A transcript cannot hold an fd, only a description that replay can turn
back into an equivalent one: its kind (memfd, eventfd, socket, ...) and, for
the kinds that have one, its size.  The kind comes from ``fstat`` and the
``/proc/self/fd`` link, which names memfds (``/memfd:NAME``) and anonymous
inodes (``anon_inode:[eventfd]``).
"""

from __future__ import annotations

import os
import socket
import stat
from dataclasses import dataclass
from typing import Any

#: Kinds replay can recreate; anything else is recreated as an empty memfd.
FD_KINDS = ("memfd", "eventfd", "socket", "file", "pipe", "other")


@dataclass(frozen=True)
class FdInfo:
    """A file descriptor as a transcript records it."""

    kind: str
    #: Bytes in the file, for memfds and regular files; ``None`` otherwise.
    size: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "size": self.size}

    @classmethod
    def from_dict(cls, data: Any) -> FdInfo:
        if not isinstance(data, dict) or not isinstance(data.get("kind"), str):
            raise ValueError(f"an fd is described as {{'kind': ..., 'size': ...}}, not {data!r}")
        size = data.get("size")
        if size is not None and (not isinstance(size, int) or size < 0):
            raise ValueError(f"fd size must be a non-negative integer, not {size!r}")
        return cls(data["kind"], size)


def describe_fd(fd: int) -> FdInfo:
    """The kind and size of ``fd`` (which stays open)."""
    try:
        st = os.fstat(fd)
    except OSError:
        return FdInfo("other")
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        target = ""
    if stat.S_ISSOCK(st.st_mode):
        return FdInfo("socket")
    if stat.S_ISFIFO(st.st_mode):
        return FdInfo("pipe")
    if target.startswith("/memfd:"):
        return FdInfo("memfd", st.st_size)
    if target == "anon_inode:[eventfd]":
        return FdInfo("eventfd")
    if stat.S_ISREG(st.st_mode):
        return FdInfo("file", st.st_size)
    return FdInfo("other")


def create_fd(info: FdInfo) -> tuple[int, tuple[int, ...]]:
    """A new fd like the one ``info`` describes, and any fds kept to support it.

    A socket is one end of a fresh socket pair (the other end is the second
    item, for the caller to close); a regular file becomes a memfd of the
    same size, since only its contents could matter to a peer.
    """
    match info.kind:
        case "eventfd":
            return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK), ()
        case "socket":
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            return theirs.detach(), (ours.detach(),)
        case "pipe":
            read_end, write_end = os.pipe2(os.O_CLOEXEC)
            return read_end, (write_end,)
        case _:
            fd = os.memfd_create("vdev-replay", os.MFD_CLOEXEC)
            try:
                os.ftruncate(fd, info.size or 0)
            except BaseException:
                os.close(fd)
                raise
            return fd, ()


def close_fds(fds: tuple[int, ...] | list[int]) -> None:
    """Close every fd, ignoring ones already gone."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
