"""ERR and REQ: a device reports an unrecoverable error or asks to be released.

libvfio-user as it comes stores the client's ERR and REQ eventfds in the
interrupt vector array, in vector 0's slot, and cannot signal them; vdev's
patches 0002 and 0003 keep them apart and add ``vfu_irq_trigger_err`` /
``vfu_irq_trigger_req``, which ``device.irq.report_error()`` and
``device.irq.request_release()`` use.

What QEMU 11.1.3's ``vfio-user-pci`` does with them, as these tests see it:
at realize it sets INTx's eventfd, then ERR's (no REQ: the ``x-req`` feature
is vfio-pci's alone), then resets the device, which sets INTx again.  ERR
makes QEMU report "Unrecoverable error detected" and stop the VM
(``STOP``, status ``internal-error``).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import pytest
import trio

from vdev import RO, WO, Bar, Device, MsiX, Register
from vdev.client import Client
from vdev.libvfio_user import Library
from vdev.libvfio_user.bindings import MissingFixError
from vdev.model.events import Connect
from vdev.protocol.constants import IrqIndex
from vdev.qemu import enable_msix, q35_intx_gsi
from vdev.testing import AttachQemu, ConnectClient, served

pytestmark = pytest.mark.requires("libvfio-user")

DEADLINE = 10
MSIX_CONTROL = 0x40 + 2  # where vdev places the device's only capability, + message control


class Notifier(Device):
    """INTx and two MSI-X vectors; ERR and REQ come from ``device.irq`` in the tests."""

    vendor_id = 0x1B36
    device_id = 0x5159
    bar0 = Bar(4096, registers=[Register("id", 0x0, access=RO, reset=0x5159), Register("doorbell", 0x4, access=WO)])

    def capabilities(self) -> list[MsiX]:
        return [MsiX(vectors=2, table_bar=0, table_offset=0x800, pba_bar=0, pba_offset=0xC00)]


@pytest.mark.requires("qemu")
async def test_intx_and_msix_vector_0_fire_after_qemu_set_its_err_notifier_and_err_stops_qemu(
    vdev_qemu: AttachQemu,
) -> None:
    device = Notifier()
    vm, function = await vdev_qemu(device)
    # QEMU set its ERR eventfd at realize; INTx first, through the I/O APIC.
    gsi = q35_intx_gsi(function.address, await function.interrupt_pin())
    await vm.qtest.irq_intercept_in("ioapic")
    device.irq.raise_intx()
    with trio.fail_after(DEADLINE):
        await vm.qtest.wait_irq(gsi)
    device.irq.lower_intx()
    # Then MSI-X vector 0, as a message in guest RAM.
    table = await enable_msix(function, vm.guest_memory.alloc(8))
    device.irq.trigger(0)
    with trio.fail_after(DEADLINE):
        assert await table.mailboxes[0].wait() == 0
    # And ERR still reaches QEMU's error notifier: QEMU stops the VM.
    async with vm.qmp.events("STOP") as stops:
        device.irq.report_error()
        with trio.fail_after(DEADLINE):
            await stops.get()
    assert await vm.qmp.execute("query-status") == {"status": "internal-error", "running": False}
    assert "Unrecoverable error detected" in vm.stderr_tail()


@pytest.mark.requires("qemu")
async def test_qemu_11_sets_no_req_eventfd_so_a_release_request_goes_nowhere(
    vdev_qemu: AttachQemu, caplog: pytest.LogCaptureFixture
) -> None:
    device = Notifier()
    vm, _function = await vdev_qemu(device)
    # The trigger may be deferred to the serving thread (it fires when that thread lets go of the
    # context), so the test waits for the log line itself instead of expecting it at once.
    refused = threading.Event()

    class Watch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "REQ vector 0 not delivered: No such file or directory" in record.getMessage():
                refused.set()

    watch = Watch()
    logging.getLogger("vdev").addHandler(watch)
    try:
        with caplog.at_level(logging.WARNING, logger="vdev"):
            device.irq.request_release()
            assert await trio.to_thread.run_sync(refused.wait, DEADLINE)
    finally:
        logging.getLogger("vdev").removeHandler(watch)
    assert (await vm.qmp.execute("query-status"))["running"]
    assert any(found["id"]["device"] == Notifier.device_id for found in await vm.qmp.query_pci())


async def test_err_req_and_vector_0_each_reach_their_own_eventfd(vdev_client: ConnectClient) -> None:
    """A client that sets ERR and REQ after vector 0 (vdev's client may) still gets vector 0."""
    device = Notifier()
    client = await vdev_client(device)
    await client.enable(memory=True, io=False, master=True)
    await client.config_write(MSIX_CONTROL, 0x8000, 2)  # MSI-X on, no function mask
    (vector0,) = await client.set_irqs(IrqIndex.MSIX, 0, 1)
    (err,) = await client.set_irqs(IrqIndex.ERR)
    (req,) = await client.set_irqs(IrqIndex.REQ)
    device.irq.trigger(0)
    with trio.fail_after(DEADLINE):
        assert await vector0.wait() == 1
    device.irq.report_error()
    with trio.fail_after(DEADLINE):
        assert await err.wait() == 1
    device.irq.request_release()
    device.irq.request_release()
    with trio.fail_after(DEADLINE):
        assert await req.wait() == 2
    assert (vector0.pending(), err.pending(), req.pending()) == (0, 0, 0)


async def test_without_patch_0002_req_takes_vector_0(vdev_socket_dir: Path, unpatched_libvfio_user: Library) -> None:
    """The revision as it comes: REQ's eventfd replaces vector 0's, and the device's vector 0 signals REQ."""
    device = Notifier()
    socket = vdev_socket_dir / "notifier.sock"
    async with served(device, socket, library=unpatched_libvfio_user), Client.connect(socket) as client:
        await client.enable(memory=True, io=False, master=True)
        await client.config_write(MSIX_CONTROL, 0x8000, 2)
        (vector0,) = await client.set_irqs(IrqIndex.MSIX, 0, 1)
        (req,) = await client.set_irqs(IrqIndex.REQ)
        device.irq.trigger(0)
        with trio.fail_after(DEADLINE):
            assert await req.wait() == 1
        assert vector0.pending() == 0


async def test_without_patch_0003_signalling_err_fails_naming_the_patch(
    vdev_socket_dir: Path, unpatched_libvfio_user: Library
) -> None:
    device = Notifier()
    socket = vdev_socket_dir / "notifier.sock"
    async with served(device, socket, library=unpatched_libvfio_user), Client.connect(socket):
        await device.events.wait_for(Connect)
        for signal in (device.irq.report_error, device.irq.request_release):
            with pytest.raises(MissingFixError) as missing:
                signal()
            message = str(missing.value)
            assert "\n" not in message and "0003-Add-vfu_irq_trigger_err-and-vfu_irq_trigger_req.patch" in message
