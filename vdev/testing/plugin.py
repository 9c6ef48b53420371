"""pytest fixtures for testing vdev devices (registered via the ``pytest11`` entry point).

Fixtures:

``vdev_socket_dir``
    A short temporary directory for vfio-user sockets (UNIX socket paths
    are limited to 107 bytes, which pytest's ``tmp_path`` can exceed).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def vdev_socket_dir() -> Iterator[Path]:
    """A fresh directory with a short path, removed after the test."""
    with tempfile.TemporaryDirectory(prefix="vdev-") as directory:
        yield Path(directory)
