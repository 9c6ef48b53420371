"""A small NVMe host driver on vdev's vfio-user client: enough to test a controller without a guest.

It plays what Linux's driver does — enable the controller, run admin
commands, create I/O queues, move data through PRPs — from a test, over
any vfio-user server (vdev's ``nvme`` or another)::

    async with Client.connect(socket) as client, NvmeHost.open(client) as host:
        await host.enable()
        identify = await host.identify_controller()
        await host.create_io_queues(2)
        await host.write(1, nsid=1, lba=0, data=b"x" * 4096)

Host memory is one shared memfd offered with DMA_MAP; buffers, queues and
PRP lists are carved out of it.  Completions are found by their phase
bit; an interrupt (MSI-X, MSI or INTx, as ``interrupts`` says) wakes
whoever waits for one.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio
import trio.lowlevel

from vdev.client import Client, DmaRegion, Interrupt
from vdev.protocol.constants import IrqIndex
from vdev_devices.nvme.queues import SubmissionEntry, command
from vdev_devices.nvme.spec import (
    CC_EN,
    CC_IOCQES_SHIFT,
    CC_IOSQES_SHIFT,
    COMPLETION,
    CQ_ENTRY_SIZE,
    CSTS_CFS,
    CSTS_RDY,
    DOORBELLS,
    IOCQES,
    IOSQES,
    REG_ACQ,
    REG_AQA,
    REG_ASQ,
    REG_CAP,
    REG_CC,
    REG_CSTS,
    SQ_ENTRY_SIZE,
    AdminOpcode,
    Cns,
    FeatureId,
    IoOpcode,
)

PAGE = 4096
CONFIG = 7
COMMAND_MEMORY_MASTER = 0x6
PCI_CAP_POINTER = 0x34
MSI_ID, MSIX_ID = 0x05, 0x11


class NvmeHostError(Exception):
    """The controller did something a host cannot work with (fatal status, no room, a bad answer)."""


@dataclass(frozen=True)
class Completion:
    """A completion queue entry as the host reads it."""

    result: int
    sq_head: int
    sqid: int
    cid: int
    #: The 15-bit status field (phase bit removed): SC, SCT, CRD, More, DNR.
    status: int

    @property
    def code(self) -> int:
        """SCT << 8 | SC."""
        return self.status & 0x7FF

    @property
    def dnr(self) -> bool:
        return bool(self.status >> 14 & 1)

    @property
    def ok(self) -> bool:
        return self.code == 0


@dataclass(eq=False)
class HostQueue:
    """A submission/completion queue pair as the host keeps it."""

    qid: int
    entries: int
    sq: int
    cq: int
    vector: int
    sq_tail: int = 0
    cq_head: int = 0
    phase: int = 1
    next_cid: int = 0
    done: dict[int, Completion] = field(default_factory=dict)


class NvmeHost:
    """Drive an NVMe controller through a vfio-user :class:`~vdev.client.Client`; see the module docstring."""

    def __init__(self, client: Client, memory: DmaRegion, interrupts: str, nursery: trio.Nursery) -> None:
        self.client = client
        self.memory = memory
        self.interrupts = interrupts
        self._nursery = nursery
        self._next_free = 0
        self.queues: dict[int, HostQueue] = {}
        self._stride = 4
        self._wakeups: dict[int, trio.Event] = {}
        self._vectors: dict[int, Interrupt] = {}

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        client: Client,
        *,
        memory: int = 16 << 20,
        iova: int = 0x1000_0000,
        interrupts: str = "msi",
        shared: bool = True,
    ) -> AsyncIterator[NvmeHost]:
        """Map ``memory`` bytes of host memory at ``iova``, enable MEM and bus mastering.

        ``shared`` offers the memory as a memfd the server maps; without it
        every DMA becomes a DMA_READ/DMA_WRITE message the client answers.
        """
        region = await (client.dma_map_memfd if shared else client.dma_map_private)(iova, memory)
        await client.region_write(CONFIG, 0x04, COMMAND_MEMORY_MASTER.to_bytes(2, "little"))
        async with trio.open_nursery() as nursery:
            host = cls(client, region, interrupts, nursery)
            try:
                yield host
            finally:
                nursery.cancel_scope.cancel()

    # -- memory -------------------------------------------------------------------------

    def allocate(self, size: int, *, align: int = PAGE) -> int:
        """A bus address of ``size`` fresh bytes of host memory (never freed)."""
        start = -(-self._next_free // align) * align
        if start + size > self.memory.size:
            raise NvmeHostError(f"host memory exhausted ({self.memory.size} bytes)")
        self._next_free = start + size
        return self.memory.iova + start

    def read_memory(self, address: int, size: int) -> bytes:
        return self.memory.read(address - self.memory.iova, size)

    def write_memory(self, address: int, data: bytes) -> None:
        self.memory.write(address - self.memory.iova, data)

    def prps(self, pages: Sequence[int], *, offset: int = 0, list_slots: int | None = None) -> tuple[int, int]:
        """PRP1 and PRP2 for data in ``pages`` (page addresses, in order), starting ``offset`` into the first.

        With more than two pages a PRP list is built; ``list_slots`` limits
        how many entries fit in each list page (the list then starts that
        many slots before a page end), so that chaining is exercised.
        """
        prp1 = pages[0] + offset
        rest = list(pages[1:])
        if len(rest) <= 1:
            return prp1, rest[0] if rest else 0
        slots = list_slots or PAGE // 8
        chunks: list[list[int]] = []
        while rest:
            take = len(rest) if len(rest) <= slots else slots - 1
            chunks.append(rest[:take])
            rest = rest[take:]
        addresses = [self.allocate(PAGE) + PAGE - 8 * slots for _ in chunks]
        for index, chunk in enumerate(chunks):
            entries = chunk + ([addresses[index + 1]] if index + 1 < len(chunks) else [])
            self.write_memory(addresses[index], struct.pack(f"<{len(entries)}Q", *entries))
        return prp1, addresses[0]

    def buffer(self, size: int) -> tuple[int, int, int]:
        """A contiguous buffer of ``size`` bytes and its PRP1/PRP2: (address, prp1, prp2)."""
        address = self.allocate(max(size, 1))
        pages = [address + n * PAGE for n in range(-(-size // PAGE))] or [address]
        prp1, prp2 = self.prps(pages)
        return address, prp1, prp2

    # -- registers ----------------------------------------------------------------------

    async def read32(self, offset: int) -> int:
        return int.from_bytes(await self.client.region_read(0, offset, 4), "little")

    async def read64(self, offset: int) -> int:
        return int.from_bytes(await self.client.region_read(0, offset, 8), "little")

    async def write32(self, offset: int, value: int) -> None:
        await self.client.region_write(0, offset, value.to_bytes(4, "little"))

    async def write64(self, offset: int, value: int) -> None:
        await self.write32(offset, value & 0xFFFF_FFFF)
        await self.write32(offset + 4, value >> 32)

    async def csts(self) -> int:
        return await self.read32(REG_CSTS)

    # -- interrupts ---------------------------------------------------------------------

    async def _capability(self, wanted: int) -> int:
        pointer = (await self.client.region_read(CONFIG, PCI_CAP_POINTER, 1))[0]
        while pointer:
            header = await self.client.region_read(CONFIG, pointer, 2)
            if header[0] == wanted:
                return pointer
            pointer = header[1]
        raise NvmeHostError(f"the device has no capability {wanted:#x}")

    async def _setup_interrupts(self, vectors: int) -> None:
        """Enable ``vectors`` interrupts of the chosen kind and watch their eventfds."""
        if self.interrupts == "msix":
            at = await self._capability(MSIX_ID)
            control = int.from_bytes(await self.client.region_read(CONFIG, at + 2, 2), "little")
            table = int.from_bytes(await self.client.region_read(CONFIG, at + 4, 4), "little")
            vectors = min(vectors, (control & 0x7FF) + 1)
            await self.client.region_write(CONFIG, at + 2, (control | 0x8000).to_bytes(2, "little"))
            for vector in range(vectors):  # unmask each entry: vector control is the entry's last dword
                await self.write32((table & ~0x7) + 16 * vector + 12, 0)
            fired = await self.client.set_irqs(IrqIndex.MSIX, 0, vectors)
        elif self.interrupts == "msi":
            at = await self._capability(MSI_ID)
            control = int.from_bytes(await self.client.region_read(CONFIG, at + 2, 2), "little")
            vectors = min(vectors, 1 << ((control >> 1) & 0x7))
            enabled = (vectors - 1).bit_length() << 4
            await self.client.region_write(CONFIG, at + 2, (control | 0x1 | enabled).to_bytes(2, "little"))
            fired = await self.client.set_irqs(IrqIndex.MSI, 0, 1 << (vectors - 1).bit_length())
        else:
            fired = await self.client.set_irqs(IrqIndex.INTX, 0, 1)
        for vector, interrupt in enumerate(fired):
            self._vectors[vector] = interrupt
            self._wakeups[vector] = trio.Event()
            self._nursery.start_soon(self._watch, vector, interrupt)

    async def _watch(self, vector: int, interrupt: Interrupt) -> None:
        while True:
            await interrupt.wait()
            self._wakeups[vector].set()
            self._wakeups[vector] = trio.Event()

    def _vector_of(self, queue: HostQueue) -> int:
        return queue.vector if self.interrupts != "intx" else 0

    # -- controller ---------------------------------------------------------------------

    async def enable(self, *, admin_entries: int = 32, vectors: int = 4) -> None:
        """Reset the controller, give it the admin queues and enable it; raises if it reports CFS."""
        await self.write32(REG_CC, 0)
        while await self.csts() & CSTS_RDY:
            await trio.lowlevel.checkpoint()
        cap = await self.read64(REG_CAP)
        self._stride = 4 << ((cap >> 32) & 0xF)
        if not self._vectors:
            await self._setup_interrupts(vectors)
        admin = self._new_queue(0, admin_entries, vector=0)
        await self.write32(REG_AQA, (admin_entries - 1) << 16 | (admin_entries - 1))
        await self.write64(REG_ASQ, admin.sq)
        await self.write64(REG_ACQ, admin.cq)
        await self.write32(REG_CC, CC_EN | IOSQES << CC_IOSQES_SHIFT | IOCQES << CC_IOCQES_SHIFT)
        while not (status := await self.csts()) & CSTS_RDY:
            if status & CSTS_CFS:
                raise NvmeHostError(f"controller fatal status while enabling (CSTS {status:#x})")
            await trio.lowlevel.checkpoint()

    def _new_queue(self, qid: int, entries: int, vector: int) -> HostQueue:
        queue = HostQueue(
            qid, entries, self.allocate(entries * SQ_ENTRY_SIZE), self.allocate(entries * CQ_ENTRY_SIZE), vector
        )
        self.write_memory(queue.cq, bytes(entries * CQ_ENTRY_SIZE))
        self.queues[qid] = queue
        return queue

    # -- commands -----------------------------------------------------------------------

    async def submit(self, qid: int, cmd: SubmissionEntry) -> int:
        """Put ``cmd`` on queue ``qid`` with a fresh command id and ring the doorbell; returns the id."""
        queue = self.queues[qid]
        cid = queue.next_cid
        queue.next_cid = (cid + 1) & 0xFFFF
        entry = dataclasses.replace(cmd, cid=cid)
        self.write_memory(queue.sq + queue.sq_tail * SQ_ENTRY_SIZE, entry.pack())
        queue.sq_tail = (queue.sq_tail + 1) % queue.entries
        await self.write32(DOORBELLS + 2 * qid * self._stride, queue.sq_tail)
        return cid

    def _reap(self, queue: HostQueue) -> int:
        """Take the new entries of the queue's CQ; returns how many."""
        found = 0
        while True:
            raw = self.read_memory(queue.cq + queue.cq_head * CQ_ENTRY_SIZE, CQ_ENTRY_SIZE)
            result, _, sq_head, sqid, cid, status = COMPLETION.unpack(raw)
            if status & 1 != queue.phase:
                return found
            queue.done[cid] = Completion(result, sq_head, sqid, cid, status >> 1)
            queue.cq_head += 1
            if queue.cq_head == queue.entries:
                queue.cq_head, queue.phase = 0, queue.phase ^ 1
            found += 1

    async def wait(self, qid: int, cid: int) -> Completion:
        """The completion of ``cid`` on queue ``qid``, woken by the queue's interrupt."""
        queue = self.queues[qid]
        while cid not in queue.done:
            wakeup = self._wakeups[self._vector_of(queue)]
            if self._reap(queue):
                await self.write32(DOORBELLS + (2 * qid + 1) * self._stride, queue.cq_head)
                continue
            await wakeup.wait()
        return queue.done.pop(cid)

    def completed(self, qid: int, cid: int) -> Completion | None:
        """The completion of ``cid`` if it has arrived, without waiting (it is not acknowledged to the device)."""
        queue = self.queues[qid]
        self._reap(queue)
        return queue.done.get(cid)

    async def run(self, qid: int, cmd: SubmissionEntry) -> Completion:
        return await self.wait(qid, await self.submit(qid, cmd))

    async def admin(self, opcode: int, **fields: int) -> Completion:
        return await self.run(0, command(opcode, 0, **fields))

    async def check(self, qid: int, cmd: SubmissionEntry) -> Completion:
        """Run ``cmd`` and raise unless it succeeded."""
        done = await self.run(qid, cmd)
        if not done.ok:
            raise NvmeHostError(f"opcode {cmd.opcode:#x} on queue {qid} failed with status {done.code:#05x}")
        return done

    # -- common sequences -----------------------------------------------------------------

    async def identify(self, cns: int, *, nsid: int = 0) -> bytes:
        address, prp1, prp2 = self.buffer(4096)
        await self.check(0, command(AdminOpcode.IDENTIFY, 0, nsid=nsid, prp1=prp1, prp2=prp2, cdw10=cns))
        return self.read_memory(address, 4096)

    async def identify_controller(self) -> bytes:
        return await self.identify(Cns.CONTROLLER)

    async def create_io_queues(self, count: int, *, entries: int = 64, ask: int | None = None) -> None:
        """Ask for ``ask`` (default ``count``) queue pairs and create ``count``; queue ``n`` uses vector ``n``."""
        wanted = (ask or count) - 1
        await self.check(0, command(AdminOpcode.SET_FEATURES, 0, cdw10=FeatureId.NUMBER_OF_QUEUES,
                                    cdw11=wanted << 16 | wanted))  # fmt: skip
        for qid in range(1, count + 1):
            queue = self._new_queue(qid, entries, vector=qid if self.interrupts != "intx" else 0)
            await self.check(0, command(AdminOpcode.CREATE_CQ, 0, prp1=queue.cq,
                                        cdw10=(entries - 1) << 16 | qid, cdw11=queue.vector << 16 | 0x3))  # fmt: skip
            await self.check(0, command(AdminOpcode.CREATE_SQ, 0, prp1=queue.sq,
                                        cdw10=(entries - 1) << 16 | qid, cdw11=qid << 16 | 0x1))  # fmt: skip

    async def write(self, qid: int, *, nsid: int, lba: int, data: bytes, block_size: int = 512) -> Completion:
        address, prp1, prp2 = self.buffer(len(data))
        self.write_memory(address, data)
        return await self.run(qid, command(IoOpcode.WRITE, 0, nsid=nsid, prp1=prp1, prp2=prp2,
                                           cdw10=lba & 0xFFFF_FFFF, cdw11=lba >> 32,
                                           cdw12=len(data) // block_size - 1))  # fmt: skip

    async def read(self, qid: int, *, nsid: int, lba: int, blocks: int, block_size: int = 512) -> bytes:
        address, prp1, prp2 = self.buffer(blocks * block_size)
        done = await self.run(qid, command(IoOpcode.READ, 0, nsid=nsid, prp1=prp1, prp2=prp2,
                                           cdw10=lba & 0xFFFF_FFFF, cdw11=lba >> 32, cdw12=blocks - 1))  # fmt: skip
        if not done.ok:
            raise NvmeHostError(f"read failed with status {done.code:#05x}")
        return self.read_memory(address, blocks * block_size)
