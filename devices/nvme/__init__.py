"""``nvme``: an NVMe 1.4 controller that Linux's ``nvme`` driver binds and uses for real I/O.

The device (:class:`Nvme`, in :mod:`.controller`) draws its register and
command map in its docstring.  The command sets are tables in :mod:`.admin`
and :mod:`.nvm`, the specification's numbers and layouts in :mod:`.spec`,
queues and PRPs in :mod:`.queues`, namespaces in :mod:`.namespace`, and
the controller's own fault event (``nvme-command``) in :mod:`.faults`.
"""

from vdev_devices.nvme.controller import Nvme

__all__ = ["Nvme"]
