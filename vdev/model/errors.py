"""The one error a wrongly declared device raises.

A device is declared as data — identity, BARs, registers, capabilities — so
a mistake in it is found when the class is created (or, for what depends on
parameters, when the device is), never later while a client is attached.
The message is one line that names the device, the BAR, the offset and the
size involved, because it is what ``vdev serve`` prints.
"""

from __future__ import annotations


class DefinitionError(ValueError):
    """A device class, BAR, register or capability that cannot work as declared."""
