"""Experiments that boot real guest kernels against vdev devices and report what they found.

They are applications built on vdev, not part of the library: they use the
test kit, the QEMU harness and the bundled devices, and nothing in ``vdev``
imports them (installed as ``vdev_experiments``, like the devices are as
``vdev_devices``).

Each experiment is a module with a ``main`` (``python -m vdev_experiments.NAME``)
and the pieces a test reuses: a configuration, an async ``run_*`` that boots
one guest and returns the collected data with its verdicts, and the pure
analysis those verdicts come from.

* :mod:`vdev_experiments.mse` — concurrent faults on a vfio-pci BAR mapping
  while COMMAND.MEM is toggled (``make experiment``).
"""
