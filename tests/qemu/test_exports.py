"""``vdev.qemu`` exports exactly its public surface."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import vdev.qemu


def test_every_public_class_and_function_is_exported() -> None:
    defined = set()
    for module_info in pkgutil.iter_modules(vdev.qemu.__path__):
        if module_info.name.startswith("_"):
            continue
        module = importlib.import_module(f"vdev.qemu.{module_info.name}")
        for name, obj in vars(module).items():
            public = not name.startswith("_")
            if public and (inspect.isclass(obj) or inspect.isfunction(obj)):
                if obj.__module__ == module.__name__:
                    defined.add(name)
    assert defined <= set(vdev.qemu.__all__)


def test_every_export_exists() -> None:
    for name in vdev.qemu.__all__:
        assert hasattr(vdev.qemu, name), name
