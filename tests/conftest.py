"""What vdev's own suite needs from the machine, decided in one place.

A test names the provisioned components it needs with the marker
``@pytest.mark.requires("qemu", "libvfio-user", …)``; a test that uses a
fixture which serves a device (``vdev_serve``, ``vdev_client``,
``vdev_qemu``) needs libvfio-user (and QEMU for ``vdev_qemu``) without
saying so.  Before such a test runs, :func:`pytest_runtest_setup` looks for
every component: outside CI a missing one skips the test with the command
that provides it; with ``CI=true`` it fails the test, because CI must run
every test for real.  Fixtures that find something else (guest kernels) go
through the same :func:`unavailable`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import pytest

from vdev import deps
from vdev.libvfio_user import Library, bindings

#: Component name → (where it is provisioned, what to call it in a message).
COMPONENTS: dict[str, tuple[Callable[[], Path], str]] = {
    "qemu": (deps.qemu_path, "QEMU"),
    "libvfio-user": (deps.libvfio_user_path, "libvfio-user"),
    "sample-server": (lambda: deps.libvfio_user_sample("server"), "libvfio-user sample server"),
    "libvfio-user-unpatched": (deps.libvfio_user_unpatched_path, "libvfio-user built without vdev's patches"),
}

#: Fixtures that serve a device, and the components that takes.
IMPLIED_BY_FIXTURES: dict[str, tuple[str, ...]] = {
    "vdev_serve": ("libvfio-user",),
    "vdev_client": ("libvfio-user",),
    "vdev_qemu": ("libvfio-user", "qemu"),
}


def unavailable(message: str) -> NoReturn:
    """Something a test needs is missing: skip it locally, fail it in CI."""
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def require(name: str) -> Path:
    """The path of component ``name``, or :func:`unavailable` with the command that provides it."""
    find, what = COMPONENTS[name]
    path = find()
    if not path.exists():
        unavailable(f"{what} not found at {path}; run `{deps.PROVISION_COMMAND}`")
    return path


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"requires(*components): the provisioned components the test needs ({', '.join(COMPONENTS)}); "
        "skipped outside CI when missing, failed in CI",
    )


def pytest_runtest_setup(item: pytest.Item) -> None:
    needed: set[str] = set()
    for mark in item.iter_markers("requires"):
        unknown = set(mark.args) - set(COMPONENTS)
        if unknown:
            raise pytest.UsageError(f"{item.nodeid}: unknown component(s) {sorted(unknown)} in requires()")
        needed.update(mark.args)
    for fixture in getattr(item, "fixturenames", ()):
        needed.update(IMPLIED_BY_FIXTURES.get(fixture, ()))
    for name in sorted(needed):
        require(name)


@pytest.fixture
def missing() -> Callable[[str], NoReturn]:
    """:func:`unavailable`, for fixtures in other directories (conftest modules cannot import each other)."""
    return unavailable


@pytest.fixture
def qemu_binary() -> Path:
    """The provisioned QEMU wrapper."""
    return require("qemu")


@pytest.fixture(scope="session")
def unpatched_libvfio_user() -> Library:
    """The same libvfio-user revision built without vdev's patches, as a user's own build would be.

    Loaded beside the patched library, for serving a device with it
    (``DeviceContext(device, path, library)``, ``served(..., library=...)``).
    """
    path = require("libvfio-user-unpatched")
    return bindings.open_library(path, (path.parent.parent / "REVISION").read_text().strip())


@pytest.fixture
def libvfio_user_sample_server() -> Path:
    """libvfio-user's C sample server, built from the same source (a reference peer)."""
    return require("sample-server")
