"""A Trio vfio-user client for tests: drive a server, serve its DMA, watch its IRQs.

    async with Client.connect("/tmp/device.sock") as client:
        info = await client.device_info()
        await client.enable(memory=True, io=False, master=False)
        ident = await client.read32(0, 0x00)

``config_read``/``config_write``, ``enable`` and ``read8`` … ``write64``
speak integers; ``region_read``/``region_write`` move bytes.

Beyond the typed calls, ``request``/``post`` send any ``vdev.protocol``
message and ``send_raw``/``receive_raw`` send bytes the protocol forbids, for
robustness tests.
"""

from vdev.client._client import DEFAULT_MAX_MSG_FDS, DEFAULT_VERSION, Client
from vdev.client._dma import DmaAccess, DmaRegion
from vdev.client._errors import ServerDisconnected, VfioUserError
from vdev.client._info import DeviceInfo, IrqInfo, RegionInfo
from vdev.client._irq import Interrupt
from vdev.client._mapping import MappedRegion

__all__ = [
    "Client",
    "DEFAULT_MAX_MSG_FDS",
    "DEFAULT_VERSION",
    "DeviceInfo",
    "DmaAccess",
    "DmaRegion",
    "Interrupt",
    "IrqInfo",
    "MappedRegion",
    "RegionInfo",
    "ServerDisconnected",
    "VfioUserError",
]
