"""The layer contract README promises, checked on the source: which part of vdev may import which.

Bottom to top: the sans-IO codec (``protocol``) and the ctypes bindings
(``bindings``, which may read ``deps`` to find the library); the device
model (``model``), which knows the protocol's constants and nothing of
libvfio-user; the socket shell (``transport``); the Trio runtime, the client
and the proxy; then the test kit, the QEMU harness and the applications
(CLI, doctor, inspect).  Experiments live outside the library and nothing in
it imports them.  Every import counts, including those inside functions, so a
lazy import cannot hide an edge.  Adding an edge means changing
:data:`ALLOWED` here, where a reviewer sees it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "vdev"

#: Module (or package) -> layer; the longest matching prefix wins.
LAYERS = {
    "vdev": "package",
    "vdev.protocol": "protocol",
    "vdev.deps": "deps",
    "vdev.libvfio_user": "bindings",
    "vdev.model": "model",
    "vdev.transport": "transport",
    "vdev.sockets": "sockets",
    "vdev.runtime": "runtime",
    "vdev.client": "client",
    "vdev.proxy": "proxy",
    "vdev.qemu": "qemu",
    "vdev.testing": "testing",
    "vdev.provenance": "app",
    "vdev.guest": "app",
    "vdev.cli": "app",
    "vdev.__main__": "app",
    "vdev.doctor": "app",
    "vdev.inspect": "app",
    "vdev.plugins": "app",
    "vdev_devices": "devices",
    "vdev_experiments": "experiments",
}

_LIBRARY = {
    "protocol",
    "deps",
    "bindings",
    "model",
    "transport",
    "sockets",
    "runtime",
    "client",
    "proxy",
    "qemu",
    "testing",
}

#: Layer -> the layers it may import (its own is always allowed).
ALLOWED: dict[str, set[str]] = {
    "protocol": set(),
    "deps": set(),
    "bindings": {"deps"},
    "model": {"protocol"},
    "transport": {"protocol"},
    # Listening-socket paths (stdlib only), shared by the two things that listen.
    "sockets": set(),
    "runtime": {"model", "bindings", "protocol", "deps", "sockets"},
    "client": {"protocol", "transport"},
    "proxy": {"protocol", "transport", "sockets"},
    "qemu": {"deps", "protocol"},
    "testing": _LIBRARY | {"package", "app", "devices"},
    "app": _LIBRARY | {"package", "app", "devices"},
    # The package's own __init__ re-exports the model and the runtime, lazily.
    "package": {"model", "runtime"},
}


def layer_of(module: str) -> str:
    best = max((prefix for prefix in LAYERS if module == prefix or module.startswith(prefix + ".")), key=len)
    return LAYERS[best]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Every vdev module ``path`` imports, at any depth, with ``from vdev import deps`` read as ``vdev.deps``."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "vdev":
                found.update(f"vdev.{alias.name}" if f"vdev.{alias.name}" in LAYERS else "vdev" for alias in node.names)
            else:
                found.add(node.module)
    return {name for name in found if name.split(".")[0] in ("vdev", "vdev_devices", "vdev_experiments")}


def edges() -> set[tuple[str, str, str]]:
    """(importing layer, imported layer, "module -> module") for every cross-layer import in the library."""
    result = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        source = module_name(path)
        for target in imports_of(path):
            a, b = layer_of(source), layer_of(target)
            if a != b:
                result.add((a, b, f"{source} -> {target}"))
    return result


def test_every_import_in_the_library_follows_the_layers() -> None:
    forbidden = sorted(detail for a, b, detail in edges() if b not in ALLOWED[a])
    assert not forbidden, "imports that go the wrong way:\n" + "\n".join(forbidden)


def test_nothing_in_the_library_imports_the_experiments_or_the_bundled_devices_below_the_test_kit() -> None:
    low = {"protocol", "deps", "bindings", "model", "transport", "runtime", "client", "proxy", "qemu"}
    wrong = sorted(detail for a, b, detail in edges() if b in ("experiments", "devices") and a in low | {"package"})
    assert not wrong
    assert not [detail for _, b, detail in edges() if b == "experiments"]


def test_a_forbidden_edge_is_noticed(tmp_path: Path) -> None:
    """The checker itself: a model module importing the bindings is reported."""
    sneaky = tmp_path / "sneaky.py"
    sneaky.write_text("def f():\n    from vdev.libvfio_user import bindings\n    return bindings\n")
    (target,) = imports_of(sneaky)
    assert layer_of(target) == "bindings"
    assert "bindings" not in ALLOWED["model"]


@pytest.mark.parametrize(
    ("statement", "absent"),
    [
        ("import vdev.protocol", ("trio", "ctypes", "vdev.libvfio_user", "vdev.runtime", "vdev.model")),
        ("import vdev.model", ("ctypes", "vdev.libvfio_user", "vdev.runtime")),
        ("import vdev", ("trio", "ctypes", "vdev.model", "vdev.runtime")),
    ],
)
def test_importing_a_lower_layer_loads_nothing_above_it(statement: str, absent: tuple[str, ...]) -> None:
    check = f"import sys; {statement}; print(' '.join(m for m in {absent!r} if m in sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True).stdout.split()
    assert loaded == []
