"""Reproduce finding 4 of docs/findings.md: the provisioned libvfio-user's bugs, seen through vdev's client.

Usage (from the repository root, after ``make deps``)::

    make finding-libvfio-user
    python -m tools.findings.libvfio_user [--json]

Each check serves a vdev device in this process (so the server's fds are
this process's fds), drives it with vdev's own client and prints what the
library did next to what the vfio-user specification (or common sense)
asks for.  A check that shows the library behaving as asked says so: that
is how a patched library shows up here.  Message DMA ignoring the offset
inside a region is not among them: vdev corrects it before every transfer
(``vdev/runtime/context.py``, see the finding), so only removing that
correction shows it — ``tests/runtime/test_client_serving.py::test_dma_both_ways[private]``
then fails.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import trio

from vdev import Device
from vdev.client import Client, Interrupt, VfioUserError
from vdev.protocol import DmaMapRequest, IrqIndex
from vdev.provenance import collect
from vdev.testing import served
from vdev_devices.hello import Hello
from vdev_devices.idio16 import Idio16
from vdev_devices.membar import MemBar

IOVA = 0x1000_0000
SIZE = 0x1_0000


@dataclass
class Check:
    """One bug: what was done, what the library did, what was asked for, and whether they differ."""

    name: str
    trigger: str
    observed: str
    expected: str
    bug: bool


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def with_client(device: Device, body: Callable[[Client], Awaitable[Check]]) -> Check:
    with tempfile.TemporaryDirectory(prefix="vdev-libvfu-") as tmp:
        socket = Path(tmp) / "device.sock"
        async with served(device, socket):
            async with Client.connect(socket) as client:
                return await body(client)


async def repeated_map_leaks_its_fd(client: Client) -> Check:
    start = open_fds()
    region = await client.dma_map_memfd(IOVA, SIZE)
    before = open_fds()
    for _ in range(10):
        again = DmaMapRequest(address=region.iova, size=region.size, flags=region.flags, fds=(region.fd,))
        await client.request(again)
    after = open_fds()
    await client.dma_unmap(region)
    unmapped = open_fds()
    return Check(
        "repeated identical DMA_MAP",
        "map a memfd region, then send the identical DMA_MAP (same fd) 10 more times, then unmap it",
        f"all 10 accepted with {after - before} more fds open; after the unmap "
        f"{unmapped - start} fds more than before the first map are still open",
        "EEXIST for a map over an existing region (spec, DMA_MAP); no fd kept that is not used",
        unmapped - start > 0,
    )


async def overlapping_map_errno(client: Client) -> Check:
    await client.dma_map_private(IOVA, SIZE)
    try:
        await client.request(DmaMapRequest(address=IOVA + 0x1000, size=0x1000))
    except VfioUserError as exc:
        observed = errno.errorcode.get(exc.errno, str(exc.errno))
    else:
        observed = "accepted"
    return Check(
        "overlapping DMA_MAP",
        f"map [{IOVA:#x}, +{SIZE:#x}), then [{IOVA + 0x1000:#x}, +0x1000) inside it",
        observed,
        "EEXIST (spec, DMA_MAP)",
        observed != "EEXIST",
    )


async def region_count_limit(client: Client) -> Check:
    mapped = 0
    failure = "none"
    for index in range(64):
        try:
            await client.dma_map_private(IOVA + index * SIZE, SIZE)
        except VfioUserError as exc:
            failure = errno.errorcode.get(exc.errno, str(exc.errno))
            break
        mapped += 1
    return Check(
        "DMA region count",
        "map 64 disjoint 64 KiB regions without fds",
        f"{mapped} mapped, the next refused with {failure}",
        "as many as the client needs (QEMU assumes 65,535), or a limit the server advertises",
        mapped < 64,
    )


async def fds_per_sparse_area(client: Client) -> Check:
    info = await client.region_info(4)
    return Check(
        "fds in GET_REGION_INFO",
        "describe membar's BAR4 with two mapped areas (split_bar4)",
        f"{len(info.fds)} fds for {len(info.mmap_areas)} sparse areas of one file",
        "one fd per region, the areas offsets into it (QEMU 11.1.3 refuses more: 'unexpected FDs')",
        len(info.fds) > 1,
    )


async def err_eventfd_takes_vector_zero(client: Client, device: Idio16) -> Check:
    (intx,) = await client.set_irqs(IrqIndex.INTX)
    (err,) = await client.set_irqs(IrqIndex.ERR)
    await client.region_write(7, 0x04, (0x0001).to_bytes(2, "little"))  # COMMAND.IO: the card's registers are I/O
    await client.region_read(2, 0x2, 1)  # reading irq_ctl enables the card's change interrupt
    fired = {"INTx": 0, "ERR": 0}

    async def watch(name: str, interrupt: Interrupt, scope: trio.CancelScope) -> None:
        fired[name] = await interrupt.wait()
        scope.cancel()

    device.set_inputs(1)
    with trio.move_on_after(5):  # a bound for a broken build, not an ordering
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch, "INTx", intx, nursery.cancel_scope)
            nursery.start_soon(watch, "ERR", err, nursery.cancel_scope)
    fired_intx, fired_err = fired["INTx"], fired["ERR"]
    return Check(
        "ERR eventfd",
        "wire INTx to one eventfd, then ERR to another (as QEMU does at realize), then raise INTx",
        f"INTx eventfd fired {fired_intx}x, ERR eventfd fired {fired_err}x",
        "INTx fires its own eventfd; ERR is kept apart for the error notification",
        fired_err > 0 or fired_intx == 0,
    )


async def run_checks() -> list[Check]:
    idio16 = Idio16()
    return [
        await with_client(Hello(), repeated_map_leaks_its_fd),
        await with_client(Hello(), overlapping_map_errno),
        await with_client(Hello(), region_count_limit),
        await with_client(MemBar(size="64K", split_bar4=True), fds_per_sparse_area),
        await with_client(idio16, lambda client: err_eventfd_takes_vector_zero(client, idio16)),
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.findings.libvfio_user", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the checks and provenance as JSON")
    args = parser.parse_args(argv)
    checks = trio.run(run_checks)
    if args.json:
        print(json.dumps({"checks": [asdict(c) for c in checks], "provenance": collect().to_json()}, indent=1))
        return 0
    print(f"libvfio-user {collect().libvfio_user_revision}")
    for check in checks:
        print(f"\n{'BUG' if check.bug else 'ok '} {check.name}: {check.trigger}")
        print(f"    observed: {check.observed}\n    asked for: {check.expected}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
