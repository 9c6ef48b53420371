"""Fixtures for tests that boot a Linux guest (``make guest`` builds what they boot).

Outside CI, missing guest artefacts skip the test with the command that builds
them; with ``CI=true`` they fail it, like every other provisioned component.

``VDEV_GUEST_KERNELS`` (space-separated, default ``bookworm``) names the kernel
sets to run every guest test against, e.g. ``"bookworm trixie sid"`` after
``make guest KERNELS="bookworm trixie sid"``.
"""

from __future__ import annotations

import os

import pytest

from vdev.qemu.guest import DEFAULT_GUEST, GuestArtefacts

KERNELS = os.environ.get("VDEV_GUEST_KERNELS", DEFAULT_GUEST).split()


@pytest.fixture(params=KERNELS)
def guest_artefacts(request: pytest.FixtureRequest) -> GuestArtefacts:
    """A kernel set built by ``make guest``: kernel, initramfs, release."""
    try:
        return GuestArtefacts.find(request.param)
    except FileNotFoundError as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(str(exc))
        pytest.skip(str(exc))
