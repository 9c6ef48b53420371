"""Where vdev finds the real components that ``make deps`` provisions.

Everything external — the libvfio-user shared library, the QEMU wrapper —
lives in one cache folder so that a checkout, CI and a user's own project find
them the same way.  Environment variables override each location, because a
user who built libvfio-user or QEMU themselves should not have to provision
ours:

* ``VDEV_DEPS_DIR`` — the cache folder itself.  An editable install finds
  ``.deps`` in its checkout; an installed vdev (``pip install .``) has no
  checkout, so it needs this, pointed at the ``.deps`` folder of a checkout
  where ``make deps`` ran.
* ``VDEV_LIBVFIO_USER``, ``VDEV_QEMU`` — one component each, anywhere.
"""

from __future__ import annotations

import os
from pathlib import Path

#: The command that provisions everything this module looks for.
PROVISION_COMMAND = "make deps"


def checkout() -> Path | None:
    """The vdev checkout this package runs from (an editable install), or None for an installed copy."""
    root = Path(__file__).resolve().parent.parent
    return root if (root / "tools" / "provision.sh").is_file() else None


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


def how_to_provide(variable: str | None = None, command: str = PROVISION_COMMAND) -> str:
    """What to do about a missing component, for a message: the command, or the setting that is wrong.

    ``variable`` names the environment variable that overrides the
    component's location; when it is set, it is what needs fixing, not the
    provisioning.  Outside a checkout the command alone cannot help: the
    answer says to point ``VDEV_DEPS_DIR`` at a provisioned checkout.
    """
    if variable is not None and os.environ.get(variable):
        return f"fix or unset {variable} (now {os.environ[variable]!r})"
    if os.environ.get("VDEV_DEPS_DIR"):
        return f"run `{command}` in a vdev checkout with VDEV_DEPS_DIR={os.environ['VDEV_DEPS_DIR']}"
    if checkout() is None:
        return f"run `{command}` in a vdev checkout and set VDEV_DEPS_DIR to its .deps folder"
    return f"run `{command}`"


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


def libvfio_user_patches_file() -> Path:
    """The file recording the patch set ``make deps`` applied to that library.

    Next to ``REVISION``: a ``set <sha256>`` line for the whole series, then
    ``<sha256> <patch file>`` per patch.  A library built otherwise has none.
    """
    return libvfio_user_revision_file().with_name("PATCHES")


def libvfio_user_unpatched_path() -> Path:
    """The same revision built without vdev's patches, as a user's own build would be (for the suite)."""
    return cache_dir() / "libvfio-user-unpatched" / "lib" / "libvfio-user.so.0"


def libvfio_user_sample(name: str) -> Path:
    """A C sample server built from the same libvfio-user source (benchmarks, comparisons)."""
    return cache_dir() / "libvfio-user" / "samples" / name


def qemu_path() -> Path:
    """The QEMU system emulator: ``$VDEV_QEMU`` or the cache's wrapper script."""
    configured = os.environ.get("VDEV_QEMU")
    if configured:
        return Path(configured)
    return cache_dir() / "bin" / "qemu-system-x86_64"
