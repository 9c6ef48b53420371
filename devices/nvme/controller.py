"""The NVMe controller device: registers, doorbells, queues, interrupts and the command dispatcher."""

from __future__ import annotations

import collections
import logging
import math
from typing import Any

import trio

from vdev import (
    Bar,
    Device,
    DmaError,
    FaultInjected,
    Msi,
    MsiX,
    Param,
    PciExpress,
    PowerManagement,
    Register,
    ResetKind,
)
from vdev.model.capabilities import Capability
from vdev.model.registers import RO, RW, RW1C, W1S
from vdev_devices.nvme import faults as nvme_faults
from vdev_devices.nvme.admin import ADMIN_COMMANDS, DEFERRED, FEATURES
from vdev_devices.nvme.events import (
    AbortRequested,
    AdminCommandTaken,
    AsyncEventRaised,
    CommandFailed,
    ControllerEnabled,
    ControllerFatal,
    ControllerReset,
    ControllerShutdown,
    CqCreated,
    CqDeleted,
    DoorbellInvalid,
    InterruptNotDelivered,
    SqCreated,
    SqDeleted,
)
from vdev_devices.nvme.namespace import Namespace
from vdev_devices.nvme.nvm import ALL_NAMESPACES, IO_COMMANDS
from vdev_devices.nvme.queues import (
    CommandError,
    CompletionQueue,
    Held,
    SubmissionEntry,
    SubmissionQueue,
    prp_segments,
    run_owned,
)
from vdev_devices.nvme.spec import (
    AEC_NAMESPACE_ATTRIBUTE,
    AEN_ERROR_INVALID_DOORBELL,
    AEN_ERROR_INVALID_DOORBELL_VALUE,
    AEN_NOTICE_NAMESPACE_ATTRIBUTE_CHANGED,
    CC_CSS_MASK,
    CC_CSS_SHIFT,
    CC_EN,
    CC_MPS_MASK,
    CC_MPS_SHIFT,
    CC_SHN_MASK,
    CC_SHN_SHIFT,
    COMPLETION,
    CSTS_CFS,
    CSTS_RDY,
    CSTS_SHST_SHIFT,
    DOORBELLS,
    PAGE_SHIFT_MIN,
    SHST_COMPLETE,
    SQ_ENTRY_SIZE,
    VERSION_1_4,
    AsyncEventType,
    FeatureId,
    LogPage,
    Status,
    cap,
    status_field,
)
from vdev_devices.nvme.structures import (
    ASYNC_EVENT_LIMIT,
    ERROR_LOG_ENTRIES,
    ControllerIdentity,
    ErrorEntry,
    Health,
)

log = logging.getLogger("vdev.nvme")

MiB = 1 << 20
#: Submission queue entries fetched with one DMA read.
FETCH_BATCH = 64
#: The MSI-X table and PBA each start on a page of their own.
PAGE = 4096
INTERRUPT_MODES = ("msix", "msi", "intx")


def _size(text: str) -> int:
    """A size such as ``64M``, ``1G``, ``65536`` or ``0x100000``."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    text = text.strip().upper()
    if text and text[-1] in units:
        return int(text[:-1], 0) * units[text[-1]]
    return int(text, 0)


def _interrupt_mode(text: str) -> str:
    if text not in INTERRUPT_MODES:
        raise ValueError(f"interrupts: one of {', '.join(INTERRUPT_MODES)}, not {text!r}")
    return text


def _round_up(value: int, to: int) -> int:
    return -(-value // to) * to


class Nvme(Device):
    """An NVMe 1.4 controller with the NVM command set, its namespaces in memory or in files.

    BAR0 (64-bit memory, trapped; 16 KiB or more):

    ======  =====  =====  =========================================================
    offset  name   width  meaning
    ======  =====  =====  =========================================================
    0x00    CAP    8      MQES, CQR, TO, DSTRD, CSS (NVM), MPSMIN/MAX (4 KiB)
    0x08    VS     4      1.4.0
    0x0c    INTMS  4      write 1: mask MSI vectors / INTx (reads the mask)
    0x10    INTMC  4      write 1: unmask (reads the mask)
    0x14    CC     4      EN, CSS, MPS, SHN, IOSQES, IOCQES
    0x1c    CSTS   4      RDY, CFS, SHST
    0x24    AQA    4      admin queue sizes (0-based)
    0x28    ASQ    8      admin submission queue base
    0x30    ACQ    8      admin completion queue base
    0x1000  SQyTDBL, CQyHDBL  doorbells, queue y at 0x1000 + (2y [+1]) * (4 << DSTRD)
    ...     MSI-X table and PBA, each on its own page after the doorbells
    ======  =====  =====  =========================================================

    Admin commands:

    ====  ===========================  ==============================================
    op    command                      notes
    ====  ===========================  ==============================================
    0x00  Delete I/O SQ                held commands complete as aborted (SQ deletion)
    0x01  Create I/O SQ                physically contiguous only (CAP.CQR)
    0x02  Get Log Page                 01h error, 02h SMART, 03h firmware, 04h changed NS
    0x04  Delete I/O CQ
    0x05  Create I/O CQ                one interrupt vector per CQ
    0x06  Identify                     CNS 00h, 01h, 02h, 03h; 06h (NVM) answers zeroes
    0x08  Abort                        aborts commands the controller holds
    0x09  Set Features                 01h-02h, 04h-0Bh; others: Invalid Field
    0x0a  Get Features                 SEL current, default, saved, capabilities
    0x0c  Asynchronous Event Request   up to 4 outstanding
    ====  ===========================  ==============================================

    I/O commands: 0x00 Flush, 0x01 Write, 0x02 Read, 0x08 Write Zeroes,
    0x09 Dataset Management (deallocate punches holes).  Data moves
    through PRPs (PRP lists included); SGLs are refused.

    Each submission queue is served by its own Trio task; a doorbell write
    (in the device's serving thread) only moves the tail and passes the
    wake-up to Trio, so register accesses never wait for I/O.  Interrupts: MSI-X (one vector per CQ), MSI, or INTx,
    chosen by the ``interrupts`` parameter; the host decides among the
    offered ones.  Faults of its own: see :mod:`vdev_devices.nvme.faults`.
    """

    vendor_id = 0x1B36
    device_id = 0x0F02
    subsystem_vendor_id = 0x1B36
    subsystem_id = 0x0F02
    class_code = 0x010802
    express = True

    size = Param(128 * MiB, help="bytes per namespace (e.g. 64M, 1G); a backing file keeps its own size", parser=_size)
    backing = Param("", help="file holding namespace 1 (created if missing); empty: a sparse memfd")
    namespaces = Param(1, help="number of namespaces (each `size` bytes; 2 and up in memfds)")
    block_size = Param(512, help="logical block size: 512 or 4096")
    queues = Param(8, help="I/O queue pairs the controller offers")
    queue_entries = Param(1024, help="maximum entries per queue (CAP.MQES + 1)")
    doorbell_stride = Param(0, help="CAP.DSTRD: doorbells are 4 << stride bytes apart")
    mdts = Param(8, help="maximum data transfer: 2**mdts pages of 4 KiB")
    interrupts = Param("msix", help="interrupts offered: msix (with MSI), msi, or intx", parser=_interrupt_mode)
    write_cache = Param(True, help="report a volatile write cache (the host then sends Flush)")
    serial = Param("VDEV00000001", help="serial number (also seeds the namespace identifiers)")

    def __init__(self, name: str | None = None, **params: Any) -> None:
        super().__init__(name, **params)
        if not 1 <= self.queues <= 64:
            raise ValueError("queues: 1 to 64 I/O queue pairs")
        if not 2 <= self.queue_entries <= 65536:
            raise ValueError("queue_entries: 2 to 65536")
        if not 1 <= self.mdts <= 12:
            raise ValueError("mdts: 1 to 12")
        if not 0 <= self.doorbell_stride <= 8:
            raise ValueError("doorbell_stride: 0 to 8")
        count = self.namespaces
        if not 1 <= count <= 16:
            raise ValueError("namespaces: 1 to 16")
        #: The namespaces, by NSID.
        self.active_namespaces: dict[int, Namespace] = {}
        try:
            for nsid in range(1, count + 1):
                backing = self.backing if nsid == 1 and self.backing else None
                self.active_namespaces[nsid] = Namespace(
                    nsid, self.size, self.block_size, backing=backing, identity=self.serial
                )
        except BaseException:
            self.close()
            raise
        self.identity = ControllerIdentity(
            vendor_id=self.vendor_id,
            subsystem_vendor_id=self.subsystem_vendor_id,
            serial=self.serial,
            model="vdev NVMe controller",
            mdts=self.mdts,
            namespaces=count,
            write_cache=self.write_cache,
        )
        self.sqs: dict[int, SubmissionQueue] = {}
        self.cqs: dict[int, CompletionQueue] = {}
        self.health = Health()
        #: Commands taken so far, by (queue id, opcode), across queue deletions and resets.
        self.statistics: collections.Counter[tuple[int, int]] = collections.Counter()
        self.error_entries: collections.deque[ErrorEntry] = collections.deque(maxlen=ERROR_LOG_ENTRIES)
        #: Namespaces whose attributes changed since the host last read the Changed Namespace List.
        self.changed_namespaces: set[int] = set()
        self._features: dict[tuple[int, int], int] = {}
        self._queues_allocated: int | None = None
        self._cc = 0
        self._interrupt_mask = 0
        self._masked_vectors: set[int] = set()
        self._async_requests: list[tuple[SubmissionQueue, int]] = []
        self._async_events: collections.deque[tuple[int, int, int]] = collections.deque()
        self._unacknowledged: set[int] = set()
        self._coalescing_timers: set[int] = set()

    # -- declaration -------------------------------------------------------------------------

    @property
    def _doorbell_end(self) -> int:
        return DOORBELLS + 2 * (self.queues + 1) * (4 << self.doorbell_stride)

    @property
    def _msix_layout(self) -> tuple[int, int, int]:
        """(table offset, PBA offset, BAR size): each on its own page after the doorbells."""
        vectors = self.queues + 1
        table = _round_up(self._doorbell_end, PAGE)
        pba = table + _round_up(16 * vectors, PAGE)
        end = pba + PAGE
        return table, pba, max(16 * 1024, 1 << math.ceil(math.log2(end)))

    def bar_specs(self) -> list[Bar]:
        capabilities = cap(mqes=self.queue_entries - 1, timeout_500ms=20, dstrd=self.doorbell_stride)
        registers = [
            Register("cap", 0x00, width=8, access=RO, reset=capabilities),
            Register("vs", 0x08, access=RO, reset=VERSION_1_4),
            Register("intms", 0x0C, access=W1S),
            Register("intmc", 0x10, access=RW1C),
            Register("cc", 0x14, access=RW),
            Register("csts", 0x1C, access=RO),
            Register("aqa", 0x24, access=RW),
            Register("asq", 0x28, width=8, access=RW),
            Register("acq", 0x30, width=8, access=RW),
        ]
        bar0 = Bar(
            self._msix_layout[2],
            kind="mem64",
            registers=registers,
            read=Nvme.read_doorbell,
            write=Nvme.write_doorbell,
            index=0,
        )
        bar0.on_write("cc")(Nvme.cc_written)
        bar0.on_write("intms")(Nvme.intms_written)
        bar0.on_write("intmc")(Nvme.intmc_written)
        return [bar0]

    def capabilities(self) -> list[Capability]:
        vectors = self.queues + 1
        offered: list[Capability] = [PowerManagement(), PciExpress(flr=True)]
        if self.interrupts in ("msix", "msi"):
            offered.append(Msi(vectors=min(32, 1 << (vectors - 1).bit_length()), per_vector_mask=True))
        if self.interrupts == "msix":
            table, pba, _ = self._msix_layout
            offered.append(MsiX(vectors=vectors, table_bar=0, table_offset=table, pba_bar=0, pba_offset=pba))
        return offered

    # -- what handlers use -----------------------------------------------------------------------

    @property
    def registers(self) -> Any:
        """BAR0's controller registers, by name (``self.registers["csts"]``)."""
        return self.bar(0)

    def namespace(self, nsid: int) -> Namespace:
        """The active namespace ``nsid``, or Invalid Namespace or Format."""
        found = self.active_namespaces.get(nsid)
        if found is None:
            raise CommandError(Status.INVALID_NAMESPACE)
        return found

    @property
    def page_size(self) -> int:
        return 1 << (PAGE_SHIFT_MIN + ((self._cc >> CC_MPS_SHIFT) & CC_MPS_MASK))

    @property
    def max_transfer(self) -> int:
        return (1 << self.mdts) * (1 << PAGE_SHIFT_MIN)

    @property
    def max_queue_entries(self) -> int:
        return self.queue_entries

    @property
    def max_io_queues(self) -> int:
        return self.queues

    @property
    def queues_allocated(self) -> int:
        """I/O queues the host may create: what Set Features (Number of Queues) granted, else the maximum."""
        return self._queues_allocated if self._queues_allocated is not None else self.max_io_queues

    @property
    def interrupt_vectors(self) -> int:
        """Vectors a completion queue may name: the MSI-X table size, MSI's enabled vectors, or INTx's one."""
        mode = self.irq.mode
        if mode == "msix":
            return self.max_io_queues + 1
        if mode == "msi":
            msi = self.config.find(Msi)
            assert msi is not None
            return 1 << ((self.config.read_int(msi.offset + 2, 2) >> 4) & 0x7)
        return 1

    @property
    def over_temperature(self) -> int:
        return self.feature(FeatureId.TEMPERATURE_THRESHOLD, 0)

    def feature(self, fid: int, instance: int) -> int:
        value = self._features.get((fid, instance))
        return FEATURES[fid].default(self, instance) if value is None else value

    def set_feature(self, fid: int, instance: int, value: int) -> None:
        self._features[(fid, instance)] = value

    def set_queue_count(self, submission: int, completion: int) -> int:
        """Number of Queues: grant what was asked (0-based) up to the maximum; DW0 says what was granted."""
        if submission == 0xFFFF or completion == 0xFFFF:
            raise CommandError(Status.INVALID_FIELD)
        if len(self.sqs) > 1 or len(self.cqs) > 1:
            raise CommandError(Status.COMMAND_SEQUENCE_ERROR)
        granted = min(max(submission, completion) + 1, self.max_io_queues)
        self._queues_allocated = granted
        self.set_feature(FeatureId.NUMBER_OF_QUEUES, 0, (granted - 1) << 16 | (granted - 1))
        return (granted - 1) << 16 | (granted - 1)

    async def to_host(self, cmd: SubmissionEntry, data: bytes) -> None:
        """Write ``data`` to the host memory the command's PRPs describe."""
        offset = 0
        for address, size in await prp_segments(self.dma.read, cmd.prp1, cmd.prp2, len(data), self.page_size):
            await self.dma.write(address, data[offset : offset + size])
            offset += size

    async def from_host(self, cmd: SubmissionEntry, length: int) -> bytes:
        """Read ``length`` bytes from the host memory the command's PRPs describe."""
        runs = await prp_segments(self.dma.read, cmd.prp1, cmd.prp2, length, self.page_size)
        if len(runs) == 1:
            return await self.dma.read(*runs[0])
        return b"".join([await self.dma.read(address, size) for address, size in runs])

    async def flush(self, namespace: Namespace) -> None:
        if namespace.path is not None:
            await trio.to_thread.run_sync(namespace.flush)

    # -- registers ---------------------------------------------------------------------------

    def cc_written(self, value: int) -> None:
        old, self._cc = self._cc, value
        if old & CC_EN and not value & CC_EN:
            self._reset_controller("host")
        elif value & CC_EN and not old & CC_EN:
            self._enable()
        old_shn, new_shn = (old >> CC_SHN_SHIFT) & CC_SHN_MASK, (value >> CC_SHN_SHIFT) & CC_SHN_MASK
        if new_shn and not old_shn:
            self._shut_down(new_shn)

    def intms_written(self, value: int) -> None:
        self._set_interrupt_mask(value)

    def intmc_written(self, value: int) -> None:
        self._set_interrupt_mask(value)

    def _set_interrupt_mask(self, mask: int) -> None:
        """INTMS sets and INTMC clears the same mask; both registers read it back."""
        unmasked = self._interrupt_mask & ~mask
        self._interrupt_mask = mask
        self.registers["intms"] = self.registers["intmc"] = mask
        if self.irq.mode == "intx":
            self._update_intx(raise_now=not mask & 1)
            return
        for vector in sorted(self._masked_vectors):
            if unmasked >> vector & 1:
                self._masked_vectors.discard(vector)
                if any(cq.vector == vector and cq.pending for cq in self.cqs.values()):
                    self._fire(vector)

    @property
    def _csts(self) -> int:
        return int(self.registers["csts"])

    @_csts.setter
    def _csts(self, value: int) -> None:
        self.registers["csts"] = value

    @property
    def _processing(self) -> bool:
        return bool(self._csts & CSTS_RDY) and not self._csts & CSTS_CFS and not (self._cc >> CC_SHN_SHIFT) & 0x3

    def read_doorbell(self, _offset: int, _size: int) -> int:
        """Doorbells, and the unimplemented registers before them, read as zero."""
        return 0

    def write_doorbell(self, offset: int, data: bytes) -> None:
        """A new SQ tail or CQ head: move the pointer and wake whoever waits for it.  Never waits itself."""
        stride = 4 << self.doorbell_stride
        if offset < DOORBELLS or len(data) != 4 or (offset - DOORBELLS) % stride:
            return
        if not self._csts & CSTS_RDY or self._csts & CSTS_CFS:
            return
        qid, is_head = divmod((offset - DOORBELLS) // stride, 2)
        value = int.from_bytes(data, "little")
        queue: SubmissionQueue | CompletionQueue | None = self.cqs.get(qid) if is_head else self.sqs.get(qid)
        if queue is None:
            self._doorbell_error(AEN_ERROR_INVALID_DOORBELL, qid, value)
        elif value >= queue.size:
            self._doorbell_error(AEN_ERROR_INVALID_DOORBELL_VALUE, qid, value)
        elif isinstance(queue, CompletionQueue):
            self.call_soon(queue.host_consumed(value))
            if self.irq.mode == "intx":
                self._update_intx(raise_now=False)
        else:
            self.call_soon(queue.ring(value))

    def _doorbell_error(self, info: int, qid: int, value: int) -> None:
        self.events.record(DoorbellInvalid(qid=qid, value=value, info=info))
        self._log_error(ErrorEntry(0, 0xFFFF, 0xFFFF, Status.INVALID_FIELD, 0, 0))
        self.raise_async_event(AsyncEventType.ERROR, info, LogPage.ERROR)

    # -- controller state ------------------------------------------------------------------------

    def _enable(self) -> None:
        """CC.EN 0 -> 1: check the configuration, set up the admin queues, report ready."""
        mps = (self._cc >> CC_MPS_SHIFT) & CC_MPS_MASK
        css = (self._cc >> CC_CSS_SHIFT) & CC_CSS_MASK
        aqa = int(self.registers["aqa"])
        sq_entries, cq_entries = (aqa & 0xFFF) + 1, ((aqa >> 16) & 0xFFF) + 1
        asq, acq = int(self.registers["asq"]) & ~0xFFF, int(self.registers["acq"]) & ~0xFFF
        problem = None
        if mps != 0:
            problem = f"CC.MPS {mps} above CAP.MPSMAX 0"
        elif css != 0:
            problem = f"CC.CSS {css}: only the NVM command set (0) is offered"
        elif sq_entries < 2 or cq_entries < 2:
            problem = f"AQA {aqa:#x}: admin queues need at least 2 entries"
        if problem is not None:
            self._fatal(problem)
            return
        self._csts = self._csts & ~(0x3 << CSTS_SHST_SHIFT)
        self.create_cq(0, acq, cq_entries, vector=0, interrupts=True)
        self.create_sq(0, asq, sq_entries, cqid=0, priority=0)
        self._csts |= CSTS_RDY
        self.events.record(ControllerEnabled(page_size=self.page_size, asq=asq, acq=acq))

    def _reset_controller(self, why: str) -> None:
        """Controller reset: every queue and held command dropped, features back to defaults, not ready."""
        for sq in self.sqs.values():
            self._drop(sq)
        self.sqs.clear()
        self.cqs.clear()
        self._async_requests.clear()
        self._async_events.clear()
        self._unacknowledged.clear()
        self._features.clear()
        self._queues_allocated = None
        self._masked_vectors.clear()
        self._interrupt_mask = 0
        self.registers["intms"] = self.registers["intmc"] = 0
        if self.irq.intx_level:
            self.irq.lower_intx()
        self._csts = self._csts & (0x3 << CSTS_SHST_SHIFT)
        self.events.record(ControllerReset(why=why))

    def _shut_down(self, kind: int) -> None:
        """CC.SHN: stop taking commands and report the shutdown complete; a reset is needed to go on."""
        self._csts = (self._csts & ~(0x3 << CSTS_SHST_SHIFT)) | SHST_COMPLETE << CSTS_SHST_SHIFT
        self.events.record(ControllerShutdown(abrupt=kind == 2))

    def _fatal(self, why: str) -> None:
        """Controller Fatal Status: stop processing every queue until the host resets the controller."""
        if not self._csts & CSTS_CFS:
            self._csts |= CSTS_CFS
            self.events.record(ControllerFatal(why=why))
            log.warning("%s: controller fatal: %s", self.name, why)

    def on_reset(self, kind: ResetKind) -> None:
        """A device reset, FLR or lost client resets the controller too: its queues were in the client's memory."""
        self.registers["cc"] = self._cc = 0
        self._reset_controller(kind.value)
        self._csts = 0

    # -- queues -------------------------------------------------------------------------------------

    def create_cq(self, qid: int, base: int, entries: int, vector: int, interrupts: bool) -> None:
        self.cqs[qid] = CompletionQueue(qid, base, entries, vector, interrupts)
        self.events.record(CqCreated(qid=qid, entries=entries, vector=vector, interrupts=interrupts))

    def create_sq(self, qid: int, base: int, entries: int, cqid: int, priority: int) -> None:
        sq = SubmissionQueue(qid, base, entries, cqid, priority)
        self.sqs[qid] = sq
        self.cqs[cqid].sqs.add(qid)
        self.start_soon(run_owned, sq, self._serve, sq)
        self.events.record(SqCreated(qid=qid, entries=entries, cqid=cqid))

    def _drop(self, sq: SubmissionQueue) -> None:
        """Stop everything working for ``sq``: at once for its tasks' next step, their scopes from Trio."""
        sq.deleted = True
        self.call_soon(sq.cancel)

    async def delete_sq(self, qid: int) -> None:
        """Stop the queue's task; commands it holds complete as aborted by SQ deletion."""
        sq = self.sqs[qid]
        self._async_requests = [(q, cid) for q, cid in self._async_requests if q is not sq]
        for held in list(sq.held.values()):
            await self._post(sq, held.cid, Status.ABORTED_SQ_DELETION, False, 0)
        sq.held.clear()
        self._drop(sq)
        del self.sqs[qid]
        cq = self.cqs.get(sq.cqid)
        if cq is not None:
            cq.sqs.discard(qid)
        self.events.record(SqDeleted(qid=qid))

    def delete_cq(self, qid: int) -> None:
        del self.cqs[qid]
        self.events.record(CqDeleted(qid=qid))

    async def _serve(self, sq: SubmissionQueue) -> None:
        """Take the commands the host submits on ``sq``, in order, for as long as the queue exists."""
        while not sq.deleted:
            if sq.empty or not self._processing:
                sq.wakeup = trio.Event()
                await sq.wakeup.wait()
                continue
            count = min(sq.available(), FETCH_BATCH)
            try:
                raw = await self.dma.read(sq.entry_address(), count * SQ_ENTRY_SIZE)
            except DmaError as exc:
                self._fatal(f"fetching from SQ {sq.qid}: {exc}")
                continue
            for index in range(count):
                if not self._processing or sq.deleted:
                    break
                sq.head = (sq.head + 1) % sq.size
                await self._execute(sq, SubmissionEntry.parse(raw[index * SQ_ENTRY_SIZE : (index + 1) * SQ_ENTRY_SIZE]))
                await trio.lowlevel.checkpoint()  # other queues and devices run between commands
            self._signal_all()

    async def _execute(self, sq: SubmissionQueue, cmd: SubmissionEntry) -> None:
        self.statistics[(sq.qid, cmd.opcode)] += 1
        if sq.qid == 0:
            admin = AdminCommandTaken(opcode=cmd.opcode, cid=cmd.cid, nsid=cmd.nsid, cdw10=cmd.cdw10, cdw11=cmd.cdw11)
            self.events.record(admin)
        if self.faults.faults:
            fault = self.faults.pick(nvme_faults.EVENT, qid=sq.qid, opcode=cmd.opcode, nsid=cmd.nsid)
            if fault is not None:
                self.events.record(FaultInjected(fault=fault, at={"qid": sq.qid, "cid": cmd.cid, "opcode": cmd.opcode}))
                if fault.action == "hang":
                    self._hold(sq, cmd, abortable=bool(fault.params.get("abortable", True)))
                    return
                if fault.action == "fatal":
                    self._fatal(f"injected on command {cmd.cid} (opcode {cmd.opcode:#x}) of SQ {sq.qid}")
                    return
                if fault.action == "status":
                    code, dnr = nvme_faults.fault_status(fault)
                    await self._post(sq, cmd.cid, code, dnr, 0, cmd=cmd)
                    return
                if fault.action == "delay":
                    self._hold(sq, cmd)
                    self.start_soon(run_owned, sq, self._run_later, sq, cmd, fault.seconds)
                    return
                if fault.action == "memory-off":
                    self.command_control.force(memory=False)
        await self._run(sq, cmd)

    def _hold(self, sq: SubmissionQueue, cmd: SubmissionEntry, *, abortable: bool = True) -> None:
        async def complete(status: int, dnr: bool, result: int) -> None:
            await self._post(sq, cmd.cid, status, dnr, result)
            self._signal(self.cqs.get(sq.cqid))

        sq.held[cmd.cid] = Held(cmd.cid, cmd.opcode, complete, abortable)

    async def _run_later(self, sq: SubmissionQueue, cmd: SubmissionEntry, seconds: float) -> None:
        await trio.sleep(seconds)
        if sq.held.pop(cmd.cid, None) is not None:
            await self._run(sq, cmd)
            self._signal(self.cqs.get(sq.cqid))

    async def _run(self, sq: SubmissionQueue, cmd: SubmissionEntry) -> None:
        """Carry the command out and post its completion (unless it completes later by itself)."""
        try:
            outcome = await self._dispatch(sq, cmd)
        except CommandError as error:
            await self._post(sq, cmd.cid, error.status, error.dnr, 0, cmd=cmd, lba=error.lba)
            return
        except DmaError as error:
            log.info("%s: command %d on SQ %d: %s", self.name, cmd.cid, sq.qid, error)
            await self._post(sq, cmd.cid, Status.DATA_TRANSFER_ERROR, False, 0, cmd=cmd)
            return
        except OSError as error:
            log.error("%s: command %d on SQ %d: backing store: %s", self.name, cmd.cid, sq.qid, error)
            media = Status.UNRECOVERED_READ_ERROR if cmd.opcode == 0x02 else Status.WRITE_FAULT
            self.health.media_errors += 1
            await self._post(sq, cmd.cid, media if sq.qid else Status.INTERNAL_ERROR, True, 0, cmd=cmd)
            return
        if outcome is not DEFERRED:
            assert isinstance(outcome, int)
            await self._post(sq, cmd.cid, Status.SUCCESS, False, outcome)

    async def _dispatch(self, sq: SubmissionQueue, cmd: SubmissionEntry) -> object:
        if cmd.fused or cmd.psdt:
            raise CommandError(Status.INVALID_FIELD)  # no fused operations, no SGLs
        if sq.qid == 0:
            admin = ADMIN_COMMANDS.get(cmd.opcode)
            if admin is None:
                raise CommandError(Status.INVALID_OPCODE)
            return await admin.handler(self, cmd, sq)
        io = IO_COMMANDS.get(cmd.opcode)
        if io is None:
            raise CommandError(Status.INVALID_OPCODE)
        if io.broadcast and cmd.nsid == ALL_NAMESPACES:
            for namespace in self.active_namespaces.values():
                await io.handler(self, cmd, namespace)
            return 0
        return await io.handler(self, cmd, self.namespace(cmd.nsid))

    async def _post(
        self,
        sq: SubmissionQueue,
        cid: int,
        status: int,
        dnr: bool,
        result: int,
        *,
        cmd: SubmissionEntry | None = None,
        lba: int = 0,
    ) -> None:
        """Write a completion entry for ``cid`` to the queue's CQ (waiting for room if it is full)."""
        cq = self.cqs.get(sq.cqid)
        if cq is None or sq.deleted:
            return
        await cq.wait_for_space()
        replaced = self.cqs.get(sq.cqid) is not cq
        if sq.deleted or replaced:
            return  # dropped by a reset or a deletion while it waited
        field = status_field(status, dnr=dnr)
        entry = COMPLETION.pack(result & 0xFFFF_FFFF, 0, sq.head, sq.qid, cid, field << 1 | cq.phase)
        try:
            await self.dma.write(cq.slot(), entry)
        except DmaError as exc:
            self._fatal(f"posting to CQ {cq.qid}: {exc}")
            return
        cq.advance()
        cq.unsignalled += 1
        if status:
            self.events.record(CommandFailed(qid=sq.qid, cid=cid, status=status, dnr=dnr))
            nsid = cmd.nsid if cmd is not None else 0
            self._log_error(ErrorEntry(0, sq.qid, cid, field, lba, nsid))

    def _log_error(self, entry: ErrorEntry) -> None:
        self.health.errors += 1
        entry.count = self.health.errors
        self.error_entries.append(entry)

    # -- interrupts -------------------------------------------------------------------------------

    def _signal_all(self) -> None:
        for cq in list(self.cqs.values()):
            if cq.unsignalled:
                self._signal(cq)

    def _signal(self, cq: CompletionQueue | None) -> None:
        """Tell the host about new completions on ``cq``, as its interrupt mode, masks and coalescing allow."""
        if cq is None or not cq.unsignalled:
            return
        if not cq.interrupts:
            cq.unsignalled = 0
            return
        mode = self.irq.mode
        if mode == "intx":
            cq.unsignalled = 0
            self._update_intx(raise_now=True)
            return
        if mode == "msi" and self._interrupt_mask >> cq.vector & 1:
            self._masked_vectors.add(cq.vector)
            return
        if self._coalesced(cq):
            return
        cq.unsignalled = 0
        self._fire(cq.vector)

    def _coalesced(self, cq: CompletionQueue) -> bool:
        """Whether interrupt coalescing holds this interrupt back (a timer will send it)."""
        setting = self.feature(FeatureId.INTERRUPT_COALESCING, 0)
        threshold, time = (setting & 0xFF) + 1, (setting >> 8) & 0xFF
        disabled = self.feature(FeatureId.INTERRUPT_VECTOR_CONFIGURATION, cq.vector) & 0x1_0000
        if cq.qid == 0 or disabled or not time or cq.unsignalled >= threshold:
            return False
        if cq.qid not in self._coalescing_timers:
            self._coalescing_timers.add(cq.qid)
            self.start_soon(self._coalescing_timer, cq, time * 100e-6)
        return True

    async def _coalescing_timer(self, cq: CompletionQueue, seconds: float) -> None:
        try:
            await trio.sleep(seconds)
        finally:
            self._coalescing_timers.discard(cq.qid)
        still_there = self.cqs.get(cq.qid) is cq
        if still_there and cq.unsignalled:
            cq.unsignalled = 0
            self._fire(cq.vector)

    def _fire(self, vector: int) -> None:
        try:
            self.irq.trigger(vector)
        except ValueError as exc:
            self.events.record(InterruptNotDelivered(vector=vector, why=str(exc)))

    def _update_intx(self, *, raise_now: bool) -> None:
        """INTx is a level: high while any interrupt-enabled CQ holds entries the host has not consumed."""
        level = not self._interrupt_mask & 1 and any(cq.interrupts and cq.pending for cq in self.cqs.values())
        if level and raise_now:
            self.irq.raise_intx()
        elif not level and self.irq.intx_level:
            self.irq.lower_intx()

    # -- asynchronous events and abort ---------------------------------------------------------------

    def hold_async_event(self, sq: SubmissionQueue, cmd: SubmissionEntry) -> bool:
        """Keep an Asynchronous Event Request until an event comes; False past the limit."""
        if len(self._async_requests) >= ASYNC_EVENT_LIMIT:
            return False
        self._hold(sq, cmd)
        self._async_requests.append((sq, cmd.cid))
        self._deliver_events()
        return True

    def raise_async_event(self, kind: AsyncEventType, info: int, page: LogPage) -> None:
        """Report an event to the host through an outstanding Asynchronous Event Request (now or later)."""
        self._async_events.append((int(kind), info, int(page)))
        self.events.record(AsyncEventRaised(type=int(kind), info=info, log=int(page)))
        self._deliver_events()

    def acknowledge_events(self, kind: AsyncEventType) -> None:
        """The host read the log page of ``kind``: events of that type may be reported again."""
        self._unacknowledged.discard(int(kind))
        self._deliver_events()

    def _deliver_events(self) -> None:
        while self._async_requests:
            event = next((e for e in self._async_events if e[0] not in self._unacknowledged), None)
            if event is None:
                return
            self._async_events.remove(event)
            kind, info, page = event
            self._unacknowledged.add(kind)
            sq, cid = self._async_requests.pop(0)
            held = sq.held.pop(cid)
            self.start_soon(run_owned, sq, held.complete, Status.SUCCESS.value, False, kind | info << 8 | page << 16)

    async def abort(self, sqid: int, cid: int) -> bool:
        """Complete a held command as aborted; False when there is none to abort (or it may not be)."""
        sq = self.sqs.get(sqid)
        held = sq.held.get(cid) if sq is not None else None
        self.events.record(AbortRequested(qid=sqid, cid=cid, aborted=bool(held and held.abortable)))
        if sq is None or held is None or not held.abortable:
            return False
        del sq.held[cid]
        self._async_requests = [(q, c) for q, c in self._async_requests if not (q is sq and c == cid)]
        self.start_soon(run_owned, sq, held.complete, Status.ABORT_REQUESTED.value, False, 0)
        return True

    # -- experiments ------------------------------------------------------------------------------------

    def resize_namespace(self, nsid: int, size: int) -> None:
        """Change a namespace's capacity and tell the host: a Namespace Attribute Changed event.

        The event goes out only if the host enabled namespace attribute
        notices (Set Features, Asynchronous Event Configuration); the
        Changed Namespace List records it either way.
        """
        self.active_namespaces[nsid].resize(size)
        self.changed_namespaces.add(nsid)
        if self.feature(FeatureId.ASYNC_EVENT_CONFIGURATION, 0) & AEC_NAMESPACE_ATTRIBUTE:
            self.raise_async_event(
                AsyncEventType.NOTICE, AEN_NOTICE_NAMESPACE_ATTRIBUTE_CHANGED, LogPage.CHANGED_NAMESPACES
            )

    def close(self) -> None:
        for namespace in getattr(self, "active_namespaces", {}).values():
            namespace.close()
        super().close()
