"""Shared fixtures for vdev's own suite.

Tests that need a provisioned component ask for it through a fixture here.
Outside CI a missing component skips the test with the command that provides
it; with ``CI=true`` it fails, because CI must run every test for real.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vdev import deps


def require(path: Path, what: str) -> Path:
    """Return ``path`` if it exists; otherwise skip (locally) or fail (in CI)."""
    if path.exists():
        return path
    message = f"{what} not found at {path}; run `{deps.PROVISION_COMMAND}`"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture
def qemu_binary() -> Path:
    """The provisioned QEMU wrapper."""
    return require(deps.qemu_path(), "QEMU")


@pytest.fixture
def libvfio_user_library() -> Path:
    """The provisioned libvfio-user shared library."""
    return require(deps.libvfio_user_path(), "libvfio-user")


@pytest.fixture
def libvfio_user_sample_server() -> Path:
    """libvfio-user's C sample server, built from the same source (a reference peer)."""
    return require(deps.libvfio_user_sample("server"), "libvfio-user sample server")
