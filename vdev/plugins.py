"""Finding device classes: by entry point (group ``vdev.devices``) or by ``module:Class``.

Third-party packages publish devices by declaring an entry point in the
``vdev.devices`` group; vdev's own bundled devices are published the same
way, so ``vdev devices`` lists both alike.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from vdev.model.device import Device

GROUP = "vdev.devices"


class PluginError(LookupError):
    """A device name or ``module:Class`` reference that does not resolve to a Device."""


def available() -> dict[str, str]:
    """Entry-point device names and the object references they point to."""
    return {ep.name: ep.value for ep in entry_points(group=GROUP)}


def load(reference: str) -> type[Device]:
    """The device class for an entry-point name or a ``module:Class`` reference."""
    if ":" in reference:
        module_name, _, attribute = reference.partition(":")
        try:
            target = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError) as exc:
            raise PluginError(f"cannot load {reference}: {exc}") from None
    else:
        matches = [ep for ep in entry_points(group=GROUP) if ep.name == reference]
        if not matches:
            known = ", ".join(sorted(available())) or "none installed"
            raise PluginError(f"no device named {reference!r} (known: {known})")
        target = matches[0].load()
    if not (isinstance(target, type) and issubclass(target, Device)):
        raise PluginError(f"{reference} is not a vdev Device subclass")
    return target
