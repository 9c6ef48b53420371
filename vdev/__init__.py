"""vdev: emulated PCI devices in Python, served over vfio-user."""
