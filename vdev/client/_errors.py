"""What the client raises when the server says no or goes away."""

from __future__ import annotations

import os

from vdev.protocol import Command, as_command


class VfioUserError(Exception):
    """The server answered a command with an error reply.

    ``errno`` is the server's error number; it may be 0, which the spec
    allows for an error without a stated reason.
    """

    def __init__(self, errno: int, command: int) -> None:
        self.errno = errno
        self.command = as_command(command)
        name = self.command.name if isinstance(self.command, Command) else f"command {command}"
        reason = os.strerror(errno) if errno else "no reason given"
        super().__init__(f"{name} failed: [Errno {errno}] {reason}")


class ServerDisconnected(ConnectionError):
    """The server closed the connection; every later call fails the same way."""
