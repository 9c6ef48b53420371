"""A Linux guest with a vfio-user device at 00:03.0 and a shell on its console.

    .venv/bin/vdev serve hello --socket-path /tmp/hello.sock &
    .venv/bin/python examples/guest_shell.py /tmp/hello.sock

The guest is the one ``make guest`` builds (busybox, the vfio modules and
vdev's guest programs, as the guest tests boot it); ``vdev.shell=1`` on the
kernel command line makes its ``/init`` start a shell instead of running
commands and powering off.  Try ``pci-list``, or bind the device to vfio-pci
(``echo 1b36 0f00 > /sys/bus/pci/drivers/vfio-pci/new_id``) and
``vfio-probe -r 0:0:4 0000:00:03.0``.  ``poweroff -f`` ends QEMU.
``--print`` prints QEMU's command line instead of running it.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

from vdev import deps
from vdev.qemu import GuestArtefacts, guest_command
from vdev.qemu.guest import BASE_APPEND
from vdev.testing import vfio_user_pci


def command(socket: Path) -> list[str]:
    guest = GuestArtefacts.find()
    return guest_command(
        deps.qemu_path(),
        kernel=guest.kernel,
        initrd=guest.initrd,
        append=f"{BASE_APPEND} vdev.shell=1",
        memory=512 << 20,
        devices=[vfio_user_pci(socket, addr="0x3")],
    )


def main(arguments: list[str]) -> int:
    printing = "--print" in arguments
    paths = [argument for argument in arguments if argument != "--print"]
    if len(paths) != 1:
        print(f"usage: {sys.argv[0]} [--print] SOCKET", file=sys.stderr)
        return 2
    try:
        argv = command(Path(paths[0]))
    except FileNotFoundError as exc:
        print(f"guest_shell: {exc}", file=sys.stderr)
        return 1
    if printing:
        print(shlex.join(argv))
        return 0
    os.execv(argv[0], argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
