"""vdev's ``nvme`` controller driven by a Python host over vdev's vfio-user client (no QEMU, no guest).

The host (:mod:`vdev_devices.nvme.host`) does what a driver does: enables
the controller, runs admin commands, creates I/O queues and moves data
through PRPs in a memfd both processes map.  Each test checks what a
driver would rely on: identify data, data in the namespace's backing
store, status codes for bad commands, events, resets and faults.
"""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from vdev.client import Client
from vdev.model.events import FaultInjected, Irq
from vdev.model.faults import DeviceFault, DeviceFaultPlan, DeviceFaultPlanError
from vdev_devices.nvme import Nvme
from vdev_devices.nvme.events import NvmeEvent
from vdev_devices.nvme.host import NvmeHost
from vdev_devices.nvme.queues import command
from vdev_devices.nvme.spec import (
    CSTS_CFS,
    CSTS_RDY,
    DOORBELLS,
    REG_CAP,
    REG_CC,
    REG_CSTS,
    REG_VS,
    AdminOpcode,
    Cns,
    FeatureId,
    IoOpcode,
    LogPage,
    Status,
)

Connect = Callable[[Nvme], Awaitable[Client]]
MiB = 1 << 20


def pattern(size: int, seed: int = 1) -> bytes:
    """Bytes that differ per 512-byte block, so a misplaced block shows."""
    blocks = -(-size // 512)
    return b"".join(struct.pack("<QQ", seed, block) * 32 for block in range(blocks))[:size]


@asynccontextmanager
async def host_for(vdev_client: Connect, device: Nvme, **options: object) -> AsyncIterator[NvmeHost]:
    client = await vdev_client(device)
    async with NvmeHost.open(client, **options) as host:  # type: ignore[arg-type]
        with trio.fail_after(30):
            await host.enable()
            yield host


def status_of(code: Status) -> int:
    return code.value


# -- bring-up and identify -------------------------------------------------------------------------


async def test_enable_reports_ready_and_the_registers_a_driver_reads(vdev_client: Connect) -> None:
    device = Nvme(queues=4, doorbell_stride=1)
    async with host_for(vdev_client, device) as host:
        cap = await host.read64(REG_CAP)
        assert cap & 0xFFFF == 1023  # MQES
        assert cap >> 16 & 1  # contiguous queues required
        assert cap >> 32 & 0xF == 1  # DSTRD as configured
        assert cap >> 37 & 1  # NVM command set
        assert await host.read32(REG_VS) == 0x0001_0400
        assert await host.csts() & (CSTS_RDY | CSTS_CFS) == CSTS_RDY
        # doorbells 8 bytes apart with stride 1: the admin queue works through them
        ident = await host.identify_controller()
        assert ident[4:24].decode().strip() == "VDEV00000001"


async def test_identify_controller_namespace_and_lists(vdev_client: Connect) -> None:
    device = Nvme(size=8 * MiB, namespaces=2, serial="SN42")
    async with host_for(vdev_client, device) as host:
        ctrl = await host.identify_controller()
        vid, ssvid = struct.unpack_from("<HH", ctrl, 0)
        assert (vid, ssvid) == (0x1B36, 0x1B36)
        assert ctrl[4:24] == b"SN42".ljust(20)
        assert ctrl[24:64].decode().strip() == "vdev NVMe controller"
        assert ctrl[77] == 8  # MDTS: 1 MiB
        assert struct.unpack_from("<I", ctrl, 80)[0] == 0x0001_0400
        assert (ctrl[512], ctrl[513]) == (0x66, 0x44)  # SQES, CQES
        assert struct.unpack_from("<I", ctrl, 516)[0] == 2  # NN
        assert struct.unpack_from("<H", ctrl, 520)[0] & 0b1100 == 0b1100  # DSM, Write Zeroes
        assert ctrl[768:800].rstrip(b"\0").decode().endswith(":SN42")

        ns = await host.identify(Cns.NAMESPACE, nsid=2)
        nsze, ncap = struct.unpack_from("<QQ", ns, 0)
        assert nsze == ncap == 8 * MiB // 512
        assert ns[130] == 9  # LBA format 0: 512-byte blocks

        active = await host.identify(Cns.ACTIVE_NAMESPACES, nsid=0)
        assert struct.unpack_from("<3I", active, 0) == (1, 2, 0)
        after_one = await host.identify(Cns.ACTIVE_NAMESPACES, nsid=1)
        assert struct.unpack_from("<2I", after_one, 0) == (2, 0)

        descriptors = await host.identify(Cns.NAMESPACE_DESCRIPTORS, nsid=1)
        kinds = []
        at = 0
        while descriptors[at + 1]:
            kinds.append(descriptors[at])
            at += 4 + descriptors[at + 1]
        assert kinds == [1, 2, 3, 4]  # EUI-64, NGUID, UUID, command set
        other = await host.identify(Cns.NAMESPACE_DESCRIPTORS, nsid=2)
        assert other[4:12] != descriptors[4:12]  # each namespace its own EUI-64

        missing = await host.admin(AdminOpcode.IDENTIFY, nsid=3, cdw10=Cns.NAMESPACE, prp1=host.allocate(4096))
        assert missing.code == Status.INVALID_NAMESPACE and missing.dnr


# -- data -------------------------------------------------------------------------------------------


async def test_a_pattern_written_through_a_chained_prp_list_lands_in_the_backing_store(vdev_client: Connect) -> None:
    device = Nvme(size=16 * MiB)
    async with host_for(vdev_client, device) as host:
        await host.create_io_queues(2)
        data = pattern(96 * 1024 + 512)  # 25 pages when it starts 512 bytes into the first
        # pages scattered in reverse order, so no two merge, and a PRP list of 5 slots per page: chaining
        pages = [host.allocate(4096) for _ in range(25)][::-1]
        for index, page in enumerate(pages):
            start = 0 if index == 0 else 4096 * index - 512
            chunk = data[start : start + (4096 - 512 if index == 0 else 4096)]
            host.write_memory(page + (512 if index == 0 else 0), chunk)
        prp1, prp2 = host.prps(pages, offset=512, list_slots=5)
        lba = 1000
        done = await host.run(1, command(IoOpcode.WRITE, 0, nsid=1, prp1=prp1, prp2=prp2, cdw10=lba,
                                         cdw12=len(data) // 512 - 1))  # fmt: skip
        assert done.ok
        store = device.active_namespaces[1].contents(lba * 512, len(data))
        assert store == data

        back = await host.read(2, nsid=1, lba=lba, blocks=len(data) // 512)
        assert back == data
        io = {key: count for key, count in device.statistics.items() if key[0]}
        assert io == {(1, IoOpcode.WRITE): 1, (2, IoOpcode.READ): 1}


@pytest.mark.parametrize("interrupts", ["msix", "msi", "intx"])
async def test_io_completes_with_each_interrupt_mode(vdev_client: Connect, interrupts: str) -> None:
    device = Nvme(size=4 * MiB, interrupts=interrupts, queues=2)
    async with host_for(vdev_client, device, interrupts=interrupts) as host:
        await host.create_io_queues(2)
        for qid in (1, 2):
            data = pattern(8192, seed=qid)
            assert (await host.write(qid, nsid=1, lba=16 * qid, data=data)).ok
            assert await host.read(qid, nsid=1, lba=16 * qid, blocks=16) == data
        assert device.irq.mode == interrupts
        fired = {e.vector for e in device.events.of_kind(Irq) if e.type == interrupts}
        assert fired == ({0} if interrupts == "intx" else {0, 1, 2})


async def test_message_based_dma_moves_the_same_bytes(vdev_client: Connect) -> None:
    device = Nvme(size=4 * MiB)
    async with host_for(vdev_client, device, shared=False) as host:
        await host.create_io_queues(1)
        data = pattern(64 * 1024, seed=9)
        assert (await host.write(1, nsid=1, lba=8, data=data)).ok
        assert await host.read(1, nsid=1, lba=8, blocks=128) == data
        assert device.active_namespaces[1].contents(8 * 512, len(data)) == data


async def test_a_file_backed_namespace_holds_the_data(vdev_client: Connect, tmp_path: Path) -> None:
    backing = tmp_path / "ns1.img"
    device = Nvme(size=2 * MiB, backing=str(backing))
    async with host_for(vdev_client, device) as host:
        await host.create_io_queues(1)
        data = pattern(4096, seed=3)
        assert (await host.write(1, nsid=1, lba=2, data=data)).ok
        assert (await host.run(1, command(IoOpcode.FLUSH, 0, nsid=1))).ok
        assert (await host.run(1, command(IoOpcode.FLUSH, 0, nsid=0xFFFF_FFFF))).ok
    assert backing.stat().st_size == 2 * MiB
    assert backing.read_bytes()[1024 : 1024 + 4096] == data


async def test_write_zeroes_and_deallocate_leave_zeroes_and_release_storage(vdev_client: Connect) -> None:
    device = Nvme(size=4 * MiB)
    async with host_for(vdev_client, device) as host:
        await host.create_io_queues(1)
        data = pattern(256 * 1024, seed=5)
        assert (await host.write(1, nsid=1, lba=0, data=data)).ok
        used = struct.unpack_from("<Q", await host.identify(Cns.NAMESPACE, nsid=1), 16)[0]
        assert used == 512

        assert (await host.run(1, command(IoOpcode.WRITE_ZEROES, 0, nsid=1, cdw10=8, cdw12=7))).ok
        ranges = host.allocate(4096)
        host.write_memory(ranges, struct.pack("<IIQ", 0, 256, 256))  # blocks 256..511
        done = await host.run(1, command(IoOpcode.DATASET_MANAGEMENT, 0, nsid=1, prp1=ranges, cdw10=0, cdw11=1 << 2))
        assert done.ok
        store = device.active_namespaces[1].contents(0, 256 * 1024)
        assert store[:4096] == data[:4096]
        assert store[4096:8192] == bytes(4096)
        assert store[8192 : 128 * 1024] == data[8192 : 128 * 1024]
        assert store[128 * 1024 :] == bytes(128 * 1024)
        used_after = struct.unpack_from("<Q", await host.identify(Cns.NAMESPACE, nsid=1), 16)[0]
        assert used_after <= 256


# -- errors -----------------------------------------------------------------------------------------


async def test_bad_commands_fail_with_the_status_the_specification_names(vdev_client: Connect) -> None:
    device = Nvme(size=4 * MiB, queues=2)
    async with host_for(vdev_client, device) as host:
        await host.create_io_queues(1, ask=2)
        blocks = 4 * MiB // 512
        buffer = host.allocate(4096)
        cases = [
            (0, command(0x7F, 0), Status.INVALID_OPCODE),
            (1, command(0x7F, 0, nsid=1), Status.INVALID_OPCODE),
            (1, command(IoOpcode.READ, 0, nsid=9, prp1=buffer), Status.INVALID_NAMESPACE),
            (1, command(IoOpcode.READ, 0, nsid=1, prp1=buffer, cdw10=blocks), Status.LBA_OUT_OF_RANGE),
            (1, command(IoOpcode.READ, 0, nsid=1, prp1=buffer, cdw10=blocks - 1, cdw12=1), Status.LBA_OUT_OF_RANGE),
            # 1 MiB + 512 bytes: above MDTS
            (1, command(IoOpcode.READ, 0, nsid=1, prp1=buffer, cdw12=2048), Status.INVALID_FIELD),
            (1, command(IoOpcode.READ, 0, nsid=1, prp1=buffer + 1), Status.PRP_OFFSET_INVALID),
            (0, command(AdminOpcode.GET_LOG_PAGE, 0, prp1=buffer, cdw10=0x7E), Status.INVALID_LOG_PAGE),
            (0, command(AdminOpcode.GET_FEATURES, 0, cdw10=0x0C), Status.INVALID_FIELD),  # APST: not offered
            (0, command(AdminOpcode.SET_FEATURES, 0, cdw10=1 << 31 | FeatureId.ARBITRATION),
             Status.FEATURE_NOT_SAVEABLE),
            (0, command(AdminOpcode.SET_FEATURES, 0, cdw10=FeatureId.NUMBER_OF_QUEUES, cdw11=0xFFFF),
             Status.INVALID_FIELD),
            (0, command(AdminOpcode.CREATE_CQ, 0, prp1=buffer, cdw10=(16 << 16) | 3, cdw11=1),
             Status.INVALID_QUEUE_IDENTIFIER),
            (0, command(AdminOpcode.CREATE_CQ, 0, prp1=buffer, cdw10=2, cdw11=1), Status.INVALID_QUEUE_SIZE),
            (0, command(AdminOpcode.CREATE_CQ, 0, prp1=buffer, cdw10=(16 << 16) | 2, cdw11=0), Status.INVALID_FIELD),
            (0, command(AdminOpcode.CREATE_CQ, 0, prp1=buffer, cdw10=(16 << 16) | 2, cdw11=40 << 16 | 3),
             Status.INVALID_INTERRUPT_VECTOR),
            (0, command(AdminOpcode.CREATE_SQ, 0, prp1=buffer, cdw10=(16 << 16) | 2, cdw11=7 << 16 | 1),
             Status.COMPLETION_QUEUE_INVALID),
            (0, command(AdminOpcode.DELETE_CQ, 0, cdw10=1), Status.INVALID_QUEUE_DELETION),
            (0, command(AdminOpcode.DELETE_SQ, 0, cdw10=0), Status.INVALID_QUEUE_IDENTIFIER),
        ]  # fmt: skip
        for qid, cmd, expected in cases:
            done = await host.run(qid, cmd)
            assert done.code == expected, (qid, cmd, hex(done.code))
            assert done.dnr
        unmapped = await host.run(1, command(IoOpcode.READ, 0, nsid=1, prp1=0x7000_0000))
        assert unmapped.code == Status.DATA_TRANSFER_ERROR and not unmapped.dnr  # the host may retry it
        sgl = command(IoOpcode.READ, 0, nsid=1, prp1=buffer)
        done = await host.run(1, type(sgl)(**{**sgl.__dict__, "flags": 0x40}))
        assert done.code == Status.INVALID_FIELD

        errors = await host.admin(AdminOpcode.GET_LOG_PAGE, prp1=buffer, cdw10=(16 - 1) << 16 | LogPage.ERROR)
        assert errors.ok
        count, sqid, cid, field = struct.unpack_from("<QHHH", host.read_memory(buffer, 64))
        assert count == len(cases) + 2 and sqid == 1  # newest first: the SGL read
        assert field >> 1 & 0x7FF == Status.INVALID_FIELD
        assert device.health.errors == len(cases) + 2


# -- features and logs ------------------------------------------------------------------------------


async def test_features_remember_what_the_host_sets(vdev_client: Connect) -> None:
    device = Nvme(size=1 * MiB, queues=6)
    async with host_for(vdev_client, device) as host:
        granted = await host.admin(AdminOpcode.SET_FEATURES, cdw10=FeatureId.NUMBER_OF_QUEUES, cdw11=(9 << 16) | 1)
        assert granted.ok and granted.result == (5 << 16 | 5)  # 0-based: six of each, the maximum
        current = await host.admin(AdminOpcode.GET_FEATURES, cdw10=FeatureId.NUMBER_OF_QUEUES)
        assert current.result == (5 << 16 | 5)

        assert (await host.admin(AdminOpcode.GET_FEATURES, cdw10=FeatureId.VOLATILE_WRITE_CACHE)).result == 1
        assert (await host.admin(AdminOpcode.SET_FEATURES, cdw10=FeatureId.VOLATILE_WRITE_CACHE, cdw11=0)).ok
        assert (await host.admin(AdminOpcode.GET_FEATURES, cdw10=FeatureId.VOLATILE_WRITE_CACHE)).result == 0
        default = await host.admin(AdminOpcode.GET_FEATURES, cdw10=1 << 8 | FeatureId.VOLATILE_WRITE_CACHE)
        assert default.result == 1

        assert (await host.admin(AdminOpcode.SET_FEATURES, cdw10=FeatureId.INTERRUPT_COALESCING, cdw11=0x0A03)).ok
        assert (await host.admin(AdminOpcode.GET_FEATURES, cdw10=FeatureId.INTERRUPT_COALESCING)).result == 0x0A03
        vector = await host.admin(AdminOpcode.GET_FEATURES, cdw10=FeatureId.INTERRUPT_VECTOR_CONFIGURATION, cdw11=2)
        assert vector.result == 2  # vector 2, coalescing applies (CD clear)

        temperature = await host.admin(AdminOpcode.GET_FEATURES, cdw10=FeatureId.TEMPERATURE_THRESHOLD)
        assert temperature.result == 343
        bad_sensor = await host.admin(AdminOpcode.GET_FEATURES, cdw10=FeatureId.TEMPERATURE_THRESHOLD, cdw11=3 << 16)
        assert bad_sensor.code == Status.INVALID_FIELD
        capabilities = await host.admin(AdminOpcode.GET_FEATURES, cdw10=3 << 8 | FeatureId.ARBITRATION)
        assert capabilities.result == 0b100  # changeable, not saveable

        # a controller reset brings every feature back to its default
        await host.enable()
        assert (await host.admin(AdminOpcode.GET_FEATURES, cdw10=FeatureId.VOLATILE_WRITE_CACHE)).result == 1


async def test_smart_and_firmware_logs(vdev_client: Connect) -> None:
    device = Nvme(size=4 * MiB)
    async with host_for(vdev_client, device) as host:
        await host.create_io_queues(1)
        for lba in range(0, 3000, 1000):
            assert (await host.write(1, nsid=1, lba=lba, data=pattern(512 * 1000))).ok
        await host.read(1, nsid=1, lba=0, blocks=8)
        buffer = host.allocate(4096)
        assert (await host.admin(AdminOpcode.GET_LOG_PAGE, prp1=buffer, cdw10=127 << 16 | LogPage.SMART)).ok
        smart = host.read_memory(buffer, 512)
        temperature = struct.unpack_from("<H", smart, 1)[0]
        read_units, written_units, reads, writes = struct.unpack_from("<Q8xQ8xQ8xQ", smart, 32)
        assert 273 < temperature < 373
        assert (read_units, written_units, reads, writes) == (1, 3, 1, 3)
        assert (await host.admin(AdminOpcode.GET_LOG_PAGE, prp1=buffer, cdw10=127 << 16 | LogPage.FIRMWARE_SLOT)).ok
        firmware = host.read_memory(buffer, 16)
        assert firmware[0] == 1 and firmware[8:16].decode().strip() == "1.0"
        # an offset into the page (dword-aligned) gives the rest of it
        partial = await host.admin(AdminOpcode.GET_LOG_PAGE, prp1=buffer, cdw10=1 << 16 | LogPage.FIRMWARE_SLOT,
                                   cdw12=8)  # fmt: skip
        assert partial.ok and host.read_memory(buffer, 8).decode().strip() == "1.0"


# -- events, abort, faults ----------------------------------------------------------------------------


async def test_a_namespace_change_completes_an_async_event_request(vdev_client: Connect) -> None:
    device = Nvme(size=4 * MiB)
    async with host_for(vdev_client, device) as host:
        enabled = await host.admin(AdminOpcode.SET_FEATURES, cdw10=FeatureId.ASYNC_EVENT_CONFIGURATION, cdw11=1 << 8)
        assert enabled.ok
        cid = await host.submit(0, command(AdminOpcode.ASYNC_EVENT_REQUEST, 0))
        assert host.completed(0, cid) is None
        # the controller answers other commands while the request waits
        await host.identify_controller()
        device.resize_namespace(1, 8 * MiB)
        with trio.fail_after(10):
            event = await host.wait(0, cid)
        assert event.ok
        assert (event.result & 0x7, event.result >> 8 & 0xFF, event.result >> 16 & 0xFF) == (2, 0, 4)
        buffer = host.allocate(4096)
        assert (await host.admin(AdminOpcode.GET_LOG_PAGE, prp1=buffer, cdw10=1023 << 16 | 0x04)).ok
        assert struct.unpack_from("<2I", host.read_memory(buffer, 8)) == (1, 0)
        nsze = struct.unpack_from("<Q", await host.identify(Cns.NAMESPACE, nsid=1))[0]
        assert nsze == 8 * MiB // 512
        # read without Retain Asynchronous Event, so the log is empty now
        assert (await host.admin(AdminOpcode.GET_LOG_PAGE, prp1=buffer, cdw10=1023 << 16 | 0x04)).ok
        assert struct.unpack_from("<I", host.read_memory(buffer, 4)) == (0,)


async def test_more_async_event_requests_than_the_limit_are_refused(vdev_client: Connect) -> None:
    device = Nvme(size=1 * MiB)
    async with host_for(vdev_client, device) as host:
        held = [await host.submit(0, command(AdminOpcode.ASYNC_EVENT_REQUEST, 0)) for _ in range(4)]
        refused = await host.admin(AdminOpcode.ASYNC_EVENT_REQUEST)
        assert refused.code == Status.ASYNC_EVENT_LIMIT_EXCEEDED
        assert all(host.completed(0, cid) is None for cid in held)


async def test_a_write_to_a_missing_queue_doorbell_is_reported_as_an_error_event(vdev_client: Connect) -> None:
    device = Nvme(size=1 * MiB)
    async with host_for(vdev_client, device) as host:
        cid = await host.submit(0, command(AdminOpcode.ASYNC_EVENT_REQUEST, 0))
        await host.write32(DOORBELLS + 2 * 5 * 4, 1)  # SQ 5 does not exist
        with trio.fail_after(10):
            event = await host.wait(0, cid)
        assert (event.result & 0x7, event.result >> 8 & 0xFF, event.result >> 16 & 0xFF) == (0, 0, 1)


async def test_abort_completes_a_hung_command_and_other_queues_go_on(vdev_client: Connect) -> None:
    device = Nvme(size=1 * MiB, queues=2)
    device.faults = DeviceFaultPlan(
        [DeviceFault(on="nvme-command", action="hang", where={"qid": 1, "opcode": IoOpcode.READ}, count=1)]
    )
    async with host_for(vdev_client, device) as host:
        await host.create_io_queues(2)
        buffer = host.allocate(4096)
        hung = await host.submit(1, command(IoOpcode.READ, 0, nsid=1, prp1=buffer))
        # the hang holds one command on queue 1, nothing else
        assert (await host.write(2, nsid=1, lba=0, data=pattern(4096))).ok
        assert (await host.write(1, nsid=1, lba=8, data=pattern(4096))).ok
        assert host.completed(1, hung) is None

        missing = await host.admin(AdminOpcode.ABORT, cdw10=77 << 16 | 1)
        assert missing.ok and missing.result & 1 == 1  # not aborted: no such command
        aborted = await host.admin(AdminOpcode.ABORT, cdw10=hung << 16 | 1)
        assert aborted.ok and aborted.result & 1 == 0
        with trio.fail_after(10):
            done = await host.wait(1, hung)
        assert done.code == Status.ABORT_REQUESTED and not done.dnr
        assert [e.fault.action for e in device.events.of_kind(FaultInjected)] == ["hang"]


async def test_an_injected_error_status_and_a_delay(vdev_client: Connect) -> None:
    device = Nvme(size=1 * MiB)
    device.faults = DeviceFaultPlan(
        [
            DeviceFault(on="nvme-command", action="status", where={"opcode": IoOpcode.READ}, count=1,
                  params={"status": "UNRECOVERED_READ_ERROR", "dnr": False}),
            DeviceFault(on="nvme-command", action="delay", where={"opcode": IoOpcode.WRITE}, count=1, seconds=0.05),
        ]
    )  # fmt: skip
    async with host_for(vdev_client, device) as host:
        await host.create_io_queues(1)
        data = pattern(4096, seed=7)
        first = await host.submit(1, command(IoOpcode.WRITE, 0, nsid=1, prp1=host.allocate(4096)))
        assert (await host.write(1, nsid=1, lba=8, data=data)).ok  # overtakes the delayed write
        with trio.fail_after(10):
            assert (await host.wait(1, first)).ok
        failed = await host.run(1, command(IoOpcode.READ, 0, nsid=1, prp1=host.allocate(4096), cdw10=8, cdw12=7))
        assert failed.code == Status.UNRECOVERED_READ_ERROR and not failed.dnr
        assert await host.read(1, nsid=1, lba=8, blocks=8) == data  # the fault was for one command only


async def test_a_fatal_fault_sets_cfs_until_the_host_resets_the_controller(vdev_client: Connect) -> None:
    device = Nvme(size=1 * MiB)
    device.faults = DeviceFaultPlan([DeviceFault(on="nvme-command", action="fatal", where={"qid": 1}, count=1)])
    async with host_for(vdev_client, device) as host:
        await host.create_io_queues(1)
        before = len(device.events.of_kind(NvmeEvent))
        flush = await host.submit(1, command(IoOpcode.FLUSH, 0, nsid=1))
        with trio.fail_after(10):
            fatal = await device.events.wait_for(NvmeEvent, count=before + 1)
        assert fatal.what == "fatal"
        assert await host.csts() & CSTS_CFS
        # a fatal controller ignores doorbells: the admin queue's tail stays where it was
        await host.submit(0, command(AdminOpcode.IDENTIFY, 0, cdw10=1, prp1=host.allocate(4096)))
        assert device.sqs[0].tail != host.queues[0].sq_tail
        assert host.completed(1, flush) is None
        await host.enable()
        assert await host.csts() & (CSTS_RDY | CSTS_CFS) == CSTS_RDY
        await host.create_io_queues(1)
        assert (await host.run(1, command(IoOpcode.FLUSH, 0, nsid=1))).ok


def test_fault_plans_for_the_controller_are_checked_when_loaded() -> None:
    with pytest.raises(DeviceFaultPlanError, match="unknown NVMe status 'NOPE'"):
        DeviceFaultPlan.from_mapping(
            {"faults": [{"on": "nvme-command", "action": "status", "params": {"status": "NOPE"}}]}
        )
    with pytest.raises(DeviceFaultPlanError, match="match on nsid, opcode, qid, not lba"):
        DeviceFaultPlan.from_mapping({"faults": [{"on": "nvme-command", "action": "hang", "where": {"lba": 3}}]})
    with pytest.raises(DeviceFaultPlanError, match="takes no parameter status"):
        DeviceFaultPlan.from_mapping({"faults": [{"on": "nvme-command", "action": "hang", "params": {"status": 1}}]})
    plan = DeviceFaultPlan.from_mapping(
        {"faults": [{"on": "nvme-command", "action": "status", "where": {"opcode": [1, 2]},
                     "params": {"status": 0x281}}]}
    )  # fmt: skip
    assert plan.pick("nvme-command", qid=1, opcode=2, nsid=1) is not None
    assert plan.pick("nvme-command", qid=1, opcode=9, nsid=1) is None


# -- controller state -------------------------------------------------------------------------------


async def test_disable_drops_the_queues_and_shutdown_reports_complete(vdev_client: Connect) -> None:
    device = Nvme(size=1 * MiB)
    async with host_for(vdev_client, device) as host:
        await host.create_io_queues(1)
        await host.write32(REG_CC, await host.read32(REG_CC) | 1 << 14)  # SHN: normal shutdown
        assert (await host.csts()) >> 2 & 0x3 == 2
        await host.write32(REG_CC, 0)
        assert await host.csts() & CSTS_RDY == 0
        assert device.sqs == {} and device.cqs == {}
        await host.enable()
        assert (await host.csts()) >> 2 & 0x3 == 0
        assert len(await host.identify_controller()) == 4096


async def test_an_unsupported_page_size_is_a_fatal_configuration(vdev_client: Connect) -> None:
    device = Nvme(size=1 * MiB)
    client = await vdev_client(device)
    async with NvmeHost.open(client) as host:
        await host.write32(0x24, (31 << 16) | 31)
        await host.write32(REG_CC, 1 | 1 << 7)  # EN with MPS = 8 KiB
        assert await host.read32(REG_CSTS) & (CSTS_RDY | CSTS_CFS) == CSTS_CFS
        assert [e.why for e in device.events.of_kind(NvmeEvent) if e.what == "fatal"]


async def test_a_hang_abort_cannot_reach_is_dropped_by_a_controller_reset(vdev_client: Connect) -> None:
    device = Nvme(size=1 * MiB)
    device.faults = DeviceFaultPlan(
        [DeviceFault(on="nvme-command", action="hang", where={"qid": 1}, count=1, params={"abortable": False})]
    )
    async with host_for(vdev_client, device) as host:
        await host.create_io_queues(1)
        hung = await host.submit(1, command(IoOpcode.FLUSH, 0, nsid=1))
        refused = await host.admin(AdminOpcode.ABORT, cdw10=hung << 16 | 1)
        assert refused.ok and refused.result & 1 == 1  # not aborted
        assert host.completed(1, hung) is None and hung in device.sqs[1].held
        await host.enable()  # a controller reset: the queue and what it held are gone
        assert device.sqs.keys() == {0}
        await host.create_io_queues(1)
        assert (await host.run(1, command(IoOpcode.FLUSH, 0, nsid=1))).ok
