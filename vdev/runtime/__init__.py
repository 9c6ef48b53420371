"""The runtime: devices served through libvfio-user contexts, a thread each, with Trio for ``async`` code."""

from vdev.runtime.context import DeviceContext, ServeError
from vdev.runtime.server import serve

__all__ = ["DeviceContext", "ServeError", "serve"]
