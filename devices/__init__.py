"""Devices bundled with vdev, published through the ``vdev.devices`` entry points."""
