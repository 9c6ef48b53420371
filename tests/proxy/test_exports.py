"""The proxy's public surface is assembled on purpose: every export exists, none is missing."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import vdev.proxy


def test_every_export_exists_once_in_order() -> None:
    exported = vdev.proxy.__all__
    assert exported == sorted(set(exported))
    for name in exported:
        assert hasattr(vdev.proxy, name), name


def test_every_public_class_is_exported() -> None:
    missing = set()
    for info in pkgutil.iter_modules(vdev.proxy.__path__):
        module_name = f"vdev.proxy.{info.name}"
        module = importlib.import_module(module_name)
        for name, value in vars(module).items():
            if inspect.isclass(value) and value.__module__ == module_name and name[0] != "_":
                missing.add(name)
    assert missing - set(vdev.proxy.__all__) == set()
