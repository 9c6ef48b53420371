"""The bottom layer: libvfio-user through ctypes.

Nothing above :mod:`vdev.runtime` touches this package; it knows C types,
prototypes and errno, and nothing about devices.
"""

from vdev.libvfio_user.bindings import (
    SUPPORTED_REVISIONS,
    Library,
    LibraryError,
    load,
)

__all__ = ["SUPPORTED_REVISIONS", "Library", "LibraryError", "load"]
