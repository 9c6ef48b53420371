"""QEMU's command line for a machine driven by qtest.

Choices that are not obvious:

* ``-qtest unix:PATH`` and ``-qmp unix:PATH`` without ``server=on`` make
  QEMU *connect* to sockets the harness already listens on, so there is no
  race waiting for QEMU to create them (QEMU's libqtest does the same).
* ``-nodefaults`` and no display, monitor or serial keep start-up fast and
  the PCI bus free of default devices.
* Guest RAM comes from a shared memfd backend by default: a vfio-user device
  server can then map guest memory for DMA, which QEMU only offers for
  shareable RAM.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

#: One ``-device``: QEMU's ``driver,prop=value`` string, or a mapping sent as JSON.
DeviceSpec = str | Mapping[str, object]

MiB = 1 << 20
MEMORY_BACKEND_ID = "vdev-ram"


def device_arg(spec: DeviceSpec) -> str:
    """The ``-device`` value for ``spec``.

    Mappings become JSON, the only ``-device`` syntax that can express nested
    properties such as ``vfio-user-pci``'s ``socket``::

        >>> device_arg({"driver": "vfio-user-pci", "socket": {"type": "unix", "path": "/s"}})
        '{"driver": "vfio-user-pci", "socket": {"type": "unix", "path": "/s"}}'
    """
    if isinstance(spec, str):
        return spec
    return json.dumps(dict(spec))


def _chardev_path(path: Path) -> str:
    # QEMU's option parser splits on commas; a doubled comma is a literal one.
    return os.fspath(path).replace(",", ",,")


def qemu_command(
    binary: str | os.PathLike[str],
    *,
    machine: str,
    memory: int,
    shared_memory: bool,
    qtest_socket: Path,
    qmp_socket: Path,
    devices: Sequence[DeviceSpec] = (),
    extra_args: Sequence[str] = (),
) -> list[str]:
    """The argument vector that starts QEMU for the harness.

    ``memory`` is in bytes and must be a whole number of MiB, the unit QEMU's
    ``-m`` and the backend size share here.
    """
    if memory <= 0 or memory % MiB:
        raise ValueError(f"memory must be a positive whole number of MiB, not {memory}")
    size = f"{memory // MiB}M"
    machine_arg = machine
    backend: list[str] = []
    if shared_memory:
        machine_arg += f",memory-backend={MEMORY_BACKEND_ID}"
        backend = [
            "-object",
            f"memory-backend-memfd,id={MEMORY_BACKEND_ID},size={size},share=on",
        ]
    args = [
        os.fspath(binary),
        "-machine",
        machine_arg,
        "-accel",
        "qtest",
        "-m",
        size,
        *backend,
        "-qtest",
        f"unix:{_chardev_path(qtest_socket)}",
        "-qtest-log",
        "none",
        "-qmp",
        f"unix:{_chardev_path(qmp_socket)}",
        "-display",
        "none",
        "-nodefaults",
        "-monitor",
        "none",
        "-serial",
        "none",
    ]
    for spec in devices:
        args += ["-device", device_arg(spec)]
    args += extra_args
    return args
