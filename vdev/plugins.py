"""Finding device classes: by entry point (group ``vdev.devices``), ``module:Class`` or ``path.py:Class``.

Third-party packages publish devices by declaring an entry point in the
``vdev.devices`` group; vdev's own bundled devices are published the same
way, so ``vdev devices`` lists both alike.

Whatever goes wrong while a device module is imported — a syntax error, a
wrongly declared BAR, an exception in the module — becomes one
:class:`PluginError` line that says where, because it is what ``vdev serve``
prints.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import traceback
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType

from vdev.model.device import Device
from vdev.model.errors import DefinitionError

GROUP = "vdev.devices"
_PACKAGE_DIR = Path(__file__).resolve().parent


class PluginError(LookupError):
    """A device name or ``module:Class`` reference that does not resolve to a Device."""


def available() -> dict[str, str]:
    """Entry-point device names and the object references they point to."""
    return {ep.name: ep.value for ep in entry_points(group=GROUP)}


def describe_failure(exc: BaseException) -> str:
    """One line for an exception raised by a device's own code: where (file:line in that code) and what.

    The place is the innermost frame outside vdev itself, so a mistake in a
    class body points at the user's line, not at the check that found it.
    """
    if isinstance(exc, SyntaxError):
        return f"{exc.filename}:{exc.lineno}: SyntaxError: {exc.msg}"
    where = ""
    for frame in traceback.extract_tb(exc.__traceback__):
        filename = Path(frame.filename)
        if frame.filename.startswith("<") or _PACKAGE_DIR in filename.resolve().parents:
            continue
        where = f"{frame.filename}:{frame.lineno}: "
    what = str(exc) if isinstance(exc, DefinitionError) else f"{type(exc).__name__}: {exc}"
    return where + what


def load(reference: str) -> type[Device]:
    """The device class for an entry-point name, a ``module:Class`` or a ``path/to/file.py:Class`` reference."""
    try:
        if ":" in reference:
            source, _, attribute = reference.rpartition(":")
            module = _import(source, attribute)
            if not hasattr(module, attribute):
                raise PluginError(f"cannot load {reference}: {source} has no attribute {attribute!r}")
            target = getattr(module, attribute)
        else:
            matches = [ep for ep in entry_points(group=GROUP) if ep.name == reference]
            if not matches:
                known = ", ".join(sorted(available())) or "none installed"
                raise PluginError(f"no device named {reference!r} (known: {known})")
            target = matches[0].load()
    except PluginError:
        raise
    except Exception as exc:  # anything the device's module does wrong
        raise PluginError(f"cannot load {reference}: {describe_failure(exc)}") from None
    if not (isinstance(target, type) and issubclass(target, Device)):
        raise PluginError(f"{reference} is not a vdev Device subclass")
    return target


def _import(source: str, attribute: str) -> ModuleType:
    if source.endswith(".py") or os.sep in source:
        return _import_file(Path(source))
    try:
        return importlib.import_module(source)
    except ModuleNotFoundError as exc:
        if exc.name is None or source != exc.name and not source.startswith(exc.name + "."):
            raise  # the module exists; something it imports does not
        raise PluginError(
            f"cannot load {source}:{attribute}: no module named {exc.name!r} on the Python path"
            f" (run vdev where it lives, set PYTHONPATH, or give its file: ./{source.replace('.', '/')}.py:{attribute})"
        ) from None


def _import_file(path: Path) -> ModuleType:
    """Import a device module from its file, as ``python path`` would (its directory on the path)."""
    if not path.is_file():
        raise PluginError(f"cannot load {path}: no such file")
    name = path.stem
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise PluginError(f"cannot load {path}: not a Python module")
    module = importlib.util.module_from_spec(spec)
    directory = str(path.resolve().parent)
    if directory not in sys.path:
        sys.path.insert(0, directory)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module
