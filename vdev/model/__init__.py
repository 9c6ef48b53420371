"""The device model: what a device is, independent of any transport.

Nothing here imports ctypes or opens a socket; :mod:`vdev.runtime` connects
a model to libvfio-user.
"""
