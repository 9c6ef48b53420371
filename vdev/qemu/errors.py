"""Errors raised by the QEMU harness.

Every error a user of :mod:`vdev.qemu` is expected to catch derives from
:class:`QemuError`, so a test can tell "the harness or QEMU failed" apart from
"my device misbehaved" with one ``except`` clause.  The subclasses say which
channel failed, because the fix differs: a bad command line, a qtest command
QEMU refused, a QMP command QEMU refused, or a QEMU that went away.
"""

from __future__ import annotations


class QemuError(Exception):
    """Base class of every error the QEMU harness raises."""


class QemuStartError(QemuError):
    """QEMU exited, or did not connect back, before the machine was ready.

    The message carries the tail of QEMU's stderr: that is where QEMU explains
    a bad option or a missing device.
    """


class QemuExitedError(QemuError):
    """QEMU exited while the machine was in use and nobody expected it to.

    Raised out of the machine's ``async with`` block, whose body is cancelled
    so that it does not wait forever for a reply from a dead process.
    """

    def __init__(self, message: str, returncode: int) -> None:
        super().__init__(message)
        #: QEMU's exit status (negative: killed by that signal).
        self.returncode = returncode


class QTestError(QemuError):
    """QEMU answered a qtest command with ``FAIL`` or ``ERR``."""

    def __init__(self, command: str, reply: str) -> None:
        super().__init__(f"qtest command {command!r} failed: {reply}")
        #: The command line that was sent, without its newline.
        self.command = command
        #: QEMU's whole reply line.
        self.reply = reply


class QTestClosedError(QemuError):
    """The qtest stream closed, so no command can be answered any more."""


class QmpCommandError(QemuError):
    """QEMU answered a QMP command with an error object."""

    def __init__(self, command: str, error_class: str, description: str) -> None:
        super().__init__(f"QMP command {command!r} failed ({error_class}): {description}")
        #: The QMP command name.
        self.command = command
        #: QMP's machine-readable class, e.g. ``GenericError`` or ``DeviceNotFound``.
        self.error_class = error_class
        #: QMP's human-readable description.
        self.description = description


class QmpClosedError(QemuError):
    """The QMP connection is gone, so commands and events can no longer flow."""


class HotplugError(QemuError):
    """A device cannot be hot-unplugged the way :func:`hot_unplug` does it."""


class PciError(QemuError):
    """A PCI helper cannot do what was asked: no such BAR, no room in a window, ..."""
