"""What can stop ``vdev guest`` before the guest boots: a kernel that cannot be used, a module build that fails."""

from __future__ import annotations


class GuestSetupError(Exception):
    """The guest could not be prepared; the message says what is missing or wrong, and how to fix it."""


class KernelError(GuestSetupError):
    """A ``--kernel`` that names no usable kernel: an unknown set, or a path without an image or modules."""


class ModuleBuildError(GuestSetupError):
    """Patched modules could not be built: no matching Debian packages, a patch that does not apply, a compile error."""
