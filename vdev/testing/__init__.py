"""Helpers for testing vdev devices — public API, used by vdev's own suite and by users.

The pytest plugin (:mod:`vdev.testing.plugin`) is registered through the
``pytest11`` entry point, so its fixtures are available in any project that
has vdev installed.
"""

from vdev.testing.memory import first_touch_ns, mapping_address, resident_pages
from vdev.testing.serving import QemuAttached, served, vfio_user_pci

__all__ = ["QemuAttached", "first_touch_ns", "mapping_address", "resident_pages", "served", "vfio_user_pci"]
