"""The public surfaces are assembled on purpose: every export exists, none is missing."""

from __future__ import annotations

import importlib
import inspect
from types import ModuleType

import pytest

PACKAGES = ["vdev.protocol", "vdev.client"]


def _public_definitions(package: ModuleType) -> set[str]:
    """Public classes and functions defined in the package's own modules."""
    names: set[str] = set()
    for module_name in getattr(package, "_DEFINING_MODULES", ()):
        module = importlib.import_module(module_name)
        for name, value in vars(module).items():
            if name.startswith("_") or not (inspect.isclass(value) or inspect.isfunction(value)):
                continue
            if value.__module__ == module_name:
                names.add(name)
    return names


@pytest.mark.parametrize("package_name", PACKAGES)
def test_every_export_is_importable_and_listed_once(package_name: str) -> None:
    package = importlib.import_module(package_name)
    exported = package.__all__
    assert len(exported) == len(set(exported))
    assert sorted(exported) == sorted(exported, key=str)
    for name in exported:
        assert hasattr(package, name), name


@pytest.mark.parametrize("package_name", PACKAGES)
def test_no_public_class_is_left_out(package_name: str) -> None:
    package = importlib.import_module(package_name)
    missing = _public_definitions(package) - set(package.__all__)
    assert not missing, f"{package_name} does not export {sorted(missing)}"
