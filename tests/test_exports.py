"""Every public namespace is assembled on purpose: each export exists, once, and nothing public is left out.

A class or function defined without a leading underscore in one of a
package's public modules is part of the package's surface and must be in its
``__all__``; a helper that should not be is named with an underscore or
lives in a private ``_module`` (where ``vdev.client`` and ``vdev.proxy`` keep
their code, re-exporting what users need).  ``vdev`` itself re-exports a
curated set from the model and the runtime, so only its exports are checked.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from types import ModuleType

import pytest

NAMESPACES = ["vdev", "vdev.protocol", "vdev.client", "vdev.proxy", "vdev.qemu", "vdev.testing", "vdev.guest"]


@pytest.mark.parametrize("name", NAMESPACES)
def test_every_export_exists_once(name: str) -> None:
    package = importlib.import_module(name)
    exported = package.__all__
    assert len(exported) == len(set(exported))
    missing = [export for export in exported if not hasattr(package, export)]
    assert not missing


def public_definitions(package: ModuleType) -> set[str]:
    defined = set()
    for info in pkgutil.iter_modules(package.__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for name, value in vars(module).items():
            own = getattr(value, "__module__", None) == module.__name__
            hook = name.startswith("pytest_")  # a pytest plugin's hooks are pytest's interface, not the package's
            if own and not name.startswith("_") and not hook and (inspect.isclass(value) or inspect.isfunction(value)):
                defined.add(name)
    return defined


@pytest.mark.parametrize("name", NAMESPACES[1:])
def test_every_public_class_and_function_is_exported(name: str) -> None:
    package = importlib.import_module(name)
    assert public_definitions(package) - set(package.__all__) == set()
