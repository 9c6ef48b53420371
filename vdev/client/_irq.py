"""Interrupts as the client sees them: eventfds the server signals."""

from __future__ import annotations

import os

import trio


class Interrupt:
    """One interrupt (``index``, ``subindex``) wired to an eventfd.

    The server signals it by writing to its copy of the eventfd; ``wait``
    returns once that happened, without polling, because the fd is watched
    by Trio's I/O loop.
    """

    def __init__(self, index: int, subindex: int) -> None:
        self.index = index
        self.subindex = subindex
        #: Non-blocking, so draining it never stalls the event loop.
        self.fd: int | None = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)

    def __repr__(self) -> str:
        return f"<Interrupt index={self.index} subindex={self.subindex}>"

    def pending(self) -> int:
        """How many times it fired since the last check (0 if none); clears the count."""
        try:
            return os.eventfd_read(self._fd())
        except BlockingIOError:
            return 0

    async def wait(self) -> int:
        """Wait for the interrupt to fire; returns how many signals were coalesced."""
        while True:
            fired = self.pending()
            if fired:
                return fired
            await trio.lowlevel.wait_readable(self._fd())

    def close(self) -> None:
        """Close our end; the server's copy keeps working until it drops it."""
        if self.fd is not None:
            trio.lowlevel.notify_closing(self.fd)
            os.close(self.fd)
            self.fd = None

    def _fd(self) -> int:
        if self.fd is None:
            raise trio.ClosedResourceError(f"{self!r} is closed")
        return self.fd
