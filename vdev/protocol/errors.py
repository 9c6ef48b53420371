# Rules of this module:
#
# * Every protocol violation is a ``ProtocolError`` carrying an errno hint: the
#   value a vfio-user peer would put in the error field of its reply.
# * ``RemoteProtocolError``: the bytes we received break the protocol (the peer
#   is at fault).  ``LocalProtocolError``: we were asked to send something that
#   breaks the protocol (our caller is at fault).  Nothing is ever sent or
#   consumed half-way because of a ``LocalProtocolError``.
# * A remote error raised for one message whose header was sound carries that
#   ``header``: the message has been consumed whole, the stream is still in
#   sync, and a server can answer it with an error reply.  A remote error
#   without a header means the framing itself is lost; the connection is dead.
"""Protocol errors, split by who broke the protocol."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vdev.protocol.header import Header


class ProtocolError(Exception):
    """A vfio-user protocol violation.

    ``errno`` is the error number a peer would reply with, so a server can turn
    any ``ProtocolError`` into an error reply without inventing a mapping.
    """

    def __init__(
        self,
        message: str,
        errno: int,
        *,
        header: Header | None = None,
        fds: tuple[int, ...] = (),
    ) -> None:
        super().__init__(message)
        self.errno = errno
        self.header = header
        self.fds = fds

    def __str__(self) -> str:
        return f"{self.args[0]} [{os.strerror(self.errno)}]"


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol does not allow.

    ``header`` is set when only the payload was at fault: the message was
    consumed whole and the connection stays usable.  ``fds`` are the file
    descriptors that arrived with the rejected message; they now belong to
    the caller, who should close them.
    """


class LocalProtocolError(ProtocolError):
    """We were asked to send something the protocol does not allow."""
