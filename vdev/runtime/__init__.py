"""The Trio runtime: devices served through libvfio-user contexts."""

from vdev.runtime.context import DeviceContext, ServeError
from vdev.runtime.server import serve

__all__ = ["DeviceContext", "ServeError", "serve"]
