"""Experiments that boot real guest kernels against vdev devices and report what they found.

Each experiment is a module with a ``main`` (``python -m vdev.experiments.NAME``)
and the pieces a test reuses: a configuration, an async ``run_*`` that boots
one guest and returns the collected data with its verdicts, and the pure
analysis those verdicts come from.

* :mod:`vdev.experiments.mse` — concurrent faults on a vfio-pci BAR mapping
  while COMMAND.MEM is toggled (``make experiment``).
"""
