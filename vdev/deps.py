"""Where vdev finds the real components that ``make deps`` provisions.

Everything external — the libvfio-user shared library, the QEMU wrapper —
lives in one cache folder so that a checkout, CI and a user's own project find
them the same way.  Environment variables override each location, because a
user who built libvfio-user or QEMU themselves should not have to provision
ours.
"""

from __future__ import annotations

import os
from pathlib import Path

#: The command that provisions everything this module looks for.
PROVISION_COMMAND = "make deps"


def cache_dir() -> Path:
    """The provisioning cache: ``$VDEV_DEPS_DIR``, else ``.deps`` in the checkout."""
    configured = os.environ.get("VDEV_DEPS_DIR")
    if configured:
        return Path(configured)
    return Path(__file__).resolve().parent.parent / ".deps"


def kernel_build_dir() -> Path:
    """What ``vdev guest`` builds for kernels: ``$VDEV_KERNEL_BUILD_DIR``, else ``kernel-builds`` in the cache.

    Patched modules (by kernel package version and patch hash), the Debian
    source and headers packages they are built from, and initramfs images
    for kernels of the user's own build.
    """
    configured = os.environ.get("VDEV_KERNEL_BUILD_DIR")
    if configured:
        return Path(configured)
    return cache_dir() / "kernel-builds"


def libvfio_user_path() -> Path:
    """The libvfio-user shared library: ``$VDEV_LIBVFIO_USER`` or the cache's build."""
    configured = os.environ.get("VDEV_LIBVFIO_USER")
    if configured:
        return Path(configured)
    return cache_dir() / "libvfio-user" / "lib" / "libvfio-user.so.0"


def libvfio_user_revision_file() -> Path:
    """The file recording which libvfio-user revision the library was built from.

    It sits next to the library's ``lib/`` folder, as ``make deps`` writes it.
    """
    return libvfio_user_path().resolve().parent.parent / "REVISION"


def libvfio_user_sample(name: str) -> Path:
    """A C sample server built from the same libvfio-user source (benchmarks, comparisons)."""
    return cache_dir() / "libvfio-user" / "samples" / name


def qemu_path() -> Path:
    """The QEMU system emulator: ``$VDEV_QEMU`` or the cache's wrapper script."""
    configured = os.environ.get("VDEV_QEMU")
    if configured:
        return Path(configured)
    return cache_dir() / "bin" / "qemu-system-x86_64"
