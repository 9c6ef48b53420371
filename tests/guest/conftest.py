"""Fixtures for tests that boot a Linux guest (``make guest`` builds what they boot).

Missing guest artefacts are handled like every other provisioned component
(``missing``, from tests/conftest.py): the message names the command that
builds them.

``VDEV_GUEST_KERNELS`` (space-separated, default ``bookworm``) names the kernel
sets to run every guest test against, e.g. ``"bookworm trixie sid"`` after
``make guest KERNELS="bookworm trixie sid"``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import NoReturn

import pytest

from vdev.qemu.guest import DEFAULT_GUEST, GuestArtefacts

KERNELS = os.environ.get("VDEV_GUEST_KERNELS", DEFAULT_GUEST).split()


@pytest.fixture(params=KERNELS)
def guest_artefacts(request: pytest.FixtureRequest, missing: Callable[[str], NoReturn]) -> GuestArtefacts:
    """A kernel set built by ``make guest``: kernel, initramfs, release."""
    try:
        return GuestArtefacts.find(request.param)
    except FileNotFoundError as exc:
        missing(str(exc))


@pytest.fixture
def guest_set(missing: Callable[[str], NoReturn]) -> Callable[[str], GuestArtefacts]:
    """A named kernel set, for the tests that are about one kernel package in particular."""

    def find(name: str) -> GuestArtefacts:
        try:
            return GuestArtefacts.find(name)
        except FileNotFoundError as exc:
            missing(str(exc))

    return find


@pytest.fixture
def bookworm(guest_set: Callable[[str], GuestArtefacts]) -> GuestArtefacts:
    """Debian 6.1's set, the kernel the controls and the variants patch."""
    return guest_set("bookworm")
