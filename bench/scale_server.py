"""N devices served from one process (benchmark 7's server): ``python -m bench.scale_server N DIR``.

Each device gets DIR/devNNN.sock; the process raises its open-file limit
first, since every device holds a listening socket, a connection and
eventfds.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

import trio

from vdev.runtime import serve
from vdev_devices.hello import Hello


def main() -> None:
    count, directory = int(sys.argv[1]), Path(sys.argv[2])
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    devices = [(Hello(name=f"dev{n:03d}"), directory / f"dev{n:03d}.sock") for n in range(count)]
    trio.run(serve, devices)


if __name__ == "__main__":
    main()
