"""The public surfaces are assembled on purpose: every export exists, none is missing."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import vdev.protocol


@pytest.mark.parametrize("package_name", ["vdev.protocol", "vdev.client"])
def test_every_export_exists_once_in_order(package_name: str) -> None:
    package = importlib.import_module(package_name)
    exported = package.__all__
    assert exported == sorted(set(exported))
    for name in exported:
        assert hasattr(package, name), name


def test_every_public_protocol_class_is_exported() -> None:
    missing = set()
    for info in pkgutil.iter_modules(vdev.protocol.__path__):
        module_name = f"vdev.protocol.{info.name}"
        module = importlib.import_module(module_name)
        for name, value in vars(module).items():
            if inspect.isclass(value) and value.__module__ == module_name and name[0] != "_":
                missing.add(name)
    assert missing - set(vdev.protocol.__all__) == set()
