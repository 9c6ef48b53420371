"""Listening sockets a parent hands over: systemd-style socket activation.

A parent that starts ``vdev serve`` may create the listening socket itself
and pass it down, so clients can connect before the server is even running
(the kernel queues them) and the parent decides the path and permissions.
Two conventions exist:

* ``vdev serve --fd N``: the vfio-user spec's convention for backend
  programs; the parent names the fd.
* systemd's socket activation: the sockets start at fd 3, ``LISTEN_FDS``
  says how many, and ``LISTEN_PID`` names the process they are meant for,
  so a child that inherits the environment does not take them for its own.

Either way the socket must already listen; libvfio-user then accepts on it
(this needs vdev's libvfio-user patch that adds ``vfu_create_ctx_from_fd``).
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

from vdev.runtime.context import ServeError

#: The first fd systemd passes (after stdin, stdout and stderr).
LISTEN_FDS_START = 3


def activated_fd(environ: MutableMapping[str, str] | None = None) -> int | None:
    """The listening socket socket activation passed to this process, or None if it passed none.

    The ``LISTEN_*`` variables are taken out of the environment, as systemd's
    own helper does, so that processes this one starts do not inherit them;
    the fd is made close-on-exec for the same reason.  One device is served
    per socket, so more than one socket is refused.
    """
    environ = os.environ if environ is None else environ
    if "LISTEN_FDS" not in environ or environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    text = environ["LISTEN_FDS"]
    for name in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
        environ.pop(name, None)
    try:
        count = int(text)
    except ValueError:
        raise ServeError(f"LISTEN_FDS={text!r} is not a number of sockets") from None
    if count < 1:
        return None
    if count > 1:
        raise ServeError(f"socket activation passed {count} sockets; vdev serve serves one device on one socket")
    try:
        os.set_inheritable(LISTEN_FDS_START, False)
    except OSError as exc:
        raise ServeError(f"socket activation's fd {LISTEN_FDS_START} is not open: {exc.strerror}") from None
    return LISTEN_FDS_START
