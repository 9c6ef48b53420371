"""A vfio-user client on Trio, built for driving and probing servers in tests."""

from __future__ import annotations

import dataclasses
import math
import mmap
import os
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from errno import EFAULT, EINVAL, EPERM
from typing import Any, NoReturn, cast

import trio

from vdev.client._dma import DmaRegion
from vdev.client._errors import ServerDisconnected, VfioUserError
from vdev.client._info import DeviceInfo, IrqInfo, RegionInfo
from vdev.client._irq import Interrupt
from vdev.client._mapping import MappedRegion
from vdev.protocol import (
    DEFAULT_MAX_DATA_XFER_SIZE,
    HEADER_SIZE,
    NEED_DATA,
    REGION_INFO_SIZE,
    REPLY_TYPES,
    Capabilities,
    Connection,
    ConnectionClosed,
    DeviceFlag,
    DeviceInfoRequest,
    DeviceResetRequest,
    DmaFlag,
    DmaMapRequest,
    DmaReadReply,
    DmaReadRequest,
    DmaUnmapRequest,
    DmaWriteReply,
    DmaWriteRequest,
    ErrorReply,
    IrqInfoFlag,
    IrqInfoRequest,
    IrqSetFlag,
    Message,
    RegionFlag,
    RegionIndex,
    RegionInfoRequest,
    RegionReadRequest,
    RegionWriteRequest,
    RemoteProtocolError,
    Reply,
    Request,
    SetIrqsRequest,
    VersionRequest,
)
from vdev.protocol.messages import ReplyT
from vdev.transport import FdStream

#: The protocol version vdev proposes: what libvfio-user and QEMU speak.
DEFAULT_VERSION = (0, 1)
#: How many fds per message the client accepts unless told otherwise;
#: libvfio-user without vdev's patch 0001 sends one per sparse mmap area of a region.
DEFAULT_MAX_MSG_FDS = 16
#: Seconds a leaving client waits for the server to close its end (see ``Client._hang_up``).
HANG_UP_PATIENCE = 1.0

# The PCI COMMAND register and the bits :meth:`Client.enable` sets.
_PCI_COMMAND = 0x04
_COMMAND_IO = 0x1
_COMMAND_MEMORY = 0x2
_COMMAND_MASTER = 0x4


def _close_fds(fds: Sequence[int]) -> None:
    for fd in fds:
        os.close(fd)


class _Call:
    """A request waiting for its reply."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.reply: Reply | None = None


class Client:
    """One connection to a vfio-user server.

    Open it with ``Client.connect``; it negotiates the version, then serves
    the server's DMA_READ/DMA_WRITE requests in the background while your
    calls wait for their replies, matched by message id.  Every fd, mapping
    and eventfd it hands out is released when the connection closes.

    Errors: an error reply raises ``VfioUserError``; a server that hangs up
    makes this and every later call raise ``ServerDisconnected``; one that
    breaks the protocol, ``RemoteProtocolError``.  Timeouts are the caller's
    business (``trio.fail_after``).
    """

    def __init__(self, stream: FdStream) -> None:
        self._stream = stream
        self._conn = Connection()
        self._send_lock = trio.Lock()
        self._pending: dict[int, _Call] = {}
        self._abandoned: set[int] = set()
        self._next_id = 0
        self._unsolicited_in, self._unsolicited_out = trio.open_memory_channel[Message](math.inf)
        self._receiver = trio.CancelScope()
        self._receive_ended = trio.Event()
        self._failure: BaseException | None = None
        self._closed = False
        self._dma: list[DmaRegion] = []
        self._interrupts: list[Interrupt] = []
        self._mappings: list[MappedRegion] = []
        self._owned_fds: list[int] = []
        #: Capabilities the server announced in its VERSION reply.
        self.server_capabilities = Capabilities()
        #: (major, minor) the server accepted, once negotiated.
        self.server_version: tuple[int, int] | None = None

    @classmethod
    @asynccontextmanager
    async def connect(
        cls,
        path: str | os.PathLike[str],
        *,
        negotiate: bool = True,
        version: tuple[int, int] = DEFAULT_VERSION,
        capabilities: Capabilities | None = None,
    ) -> AsyncIterator[Client]:
        """Connect to the server listening at ``path``; closes on exit.

        With ``negotiate=False`` nothing is sent: the first message is yours
        (to test how a server treats a bad or missing VERSION).

            async with Client.connect(path) as client:
                info = await client.device_info()
        """
        client = cls(await FdStream.connect(path))
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client._receive_loop)
                try:
                    if negotiate:
                        await client.negotiate(version=version, capabilities=capabilities)
                    yield client
                finally:
                    await client._hang_up()
                    client._receiver.cancel()
        except BaseExceptionGroup as group:
            # The nursery is an implementation detail: a lone failure (the
            # server hung up, the caller's own assertion) is raised as itself.
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from group
            raise
        finally:
            client._release()

    # --- negotiation and generic requests -----------------------------------------

    async def negotiate(
        self,
        *,
        version: tuple[int, int] = DEFAULT_VERSION,
        capabilities: Capabilities | None = None,
    ) -> Capabilities:
        """Send VERSION and check the server's answer against the spec's rules."""
        if capabilities is None:
            capabilities = Capabilities(max_msg_fds=DEFAULT_MAX_MSG_FDS, max_data_xfer_size=DEFAULT_MAX_DATA_XFER_SIZE)
        major, minor = version
        reply = await self.request(VersionRequest(major=major, minor=minor, capabilities=capabilities))
        _close_fds(reply.fds)
        if reply.major != major or reply.minor > minor:
            raise RemoteProtocolError(
                f"server answered version {reply.major}.{reply.minor} to a proposal of {major}.{minor}",
                EINVAL,
            )
        self.server_version = (reply.major, reply.minor)
        self.server_capabilities = reply.capabilities or Capabilities()
        self._conn.max_message_size = max(
            self._conn.max_message_size,
            capabilities.effective_max_data_xfer_size + 2 * HEADER_SIZE,
        )
        return self.server_capabilities

    async def request(self, message: Request[ReplyT]) -> ReplyT:
        """Send ``message`` and return its typed reply.

        The client picks the message id (``message.msg_id`` is ignored).
        The reply's ``fds`` become the caller's to close.
        """
        msg_id = self._allocate_id()
        call = _Call()
        self._pending[msg_id] = call
        try:
            await self._send(dataclasses.replace(message, msg_id=msg_id, no_reply=False))
            await call.done.wait()
        except BaseException:
            if not call.done.is_set():
                self._abandoned.add(msg_id)
            raise
        finally:
            del self._pending[msg_id]
        reply = call.reply
        if reply is None:
            self._raise_failure()
        if isinstance(reply, ErrorReply):
            _close_fds(reply.fds)
            raise VfioUserError(reply.errno, reply.command)
        expected = REPLY_TYPES.get(message.command)
        if reply.command != message.command or (expected is not None and not isinstance(reply, expected)):
            _close_fds(reply.fds)
            raise RemoteProtocolError(
                f"reply to {message.command!r} is {type(reply).__name__} for command {reply.command!r}",
                EINVAL,
            )
        return cast(ReplyT, reply)

    async def post(self, message: Request[Any]) -> None:
        """Send ``message`` with NO_REPLY: the server must not answer it."""
        msg_id = self._allocate_id()
        await self._send(dataclasses.replace(message, msg_id=msg_id, no_reply=True))

    # --- device, regions, interrupts ---------------------------------------------

    async def device_info(self) -> DeviceInfo:
        reply = await self.request(DeviceInfoRequest())
        return DeviceInfo(DeviceFlag(reply.flags), reply.num_regions, reply.num_irqs)

    async def region_info(self, index: int) -> RegionInfo:
        """Describe region ``index``, capability chain and fds included.

        Asks with the bare struct size first and, as VFIO does, asks again
        when the server announces a larger ``argsz`` for its capabilities.
        """
        argsz = REGION_INFO_SIZE
        reply = await self.request(RegionInfoRequest(index=index, argsz=argsz))
        if reply.argsz is not None and reply.argsz > argsz:
            _close_fds(reply.fds)
            reply = await self.request(RegionInfoRequest(index=index, argsz=reply.argsz))
        self._owned_fds.extend(reply.fds)
        return RegionInfo(
            index=reply.index,
            flags=RegionFlag(reply.flags),
            size=reply.size,
            offset=reply.offset,
            capabilities=reply.capabilities,
            fds=reply.fds,
        )

    async def irq_info(self, index: int) -> IrqInfo:
        reply = await self.request(IrqInfoRequest(index=index))
        return IrqInfo(reply.index, IrqInfoFlag(reply.flags), reply.count)

    async def region_read(self, index: int, offset: int, count: int) -> bytes:
        """Read through the socket (REGION_READ); returns what the server sent."""
        self._check_transfer(count)
        reply = await self.request(RegionReadRequest(region=index, offset=offset, count=count))
        _close_all(reply.fds)  # a reply to a read carries none; a misbehaving server's must not leak
        return reply.data

    async def region_write(self, index: int, offset: int, data: bytes, *, posted: bool = False) -> None:
        """Write through the socket (REGION_WRITE).

        ``posted`` sends it with NO_REPLY and returns at once, as QEMU does
        for memory BAR writes; the next non-posted command is still answered
        only after it.
        """
        self._check_transfer(len(data))
        message = RegionWriteRequest(region=index, offset=offset, data=data)
        if posted:
            await self.post(message)
        else:
            _close_all((await self.request(message)).fds)

    # --- config space and registers as integers ------------------------------------

    async def config_read(self, offset: int, size: int = 4) -> int:
        """Read ``size`` bytes of config space (region 7) at ``offset`` as a little-endian integer."""
        return int.from_bytes(await self.region_read(RegionIndex.CONFIG, offset, size), "little")

    async def config_write(self, offset: int, value: int, size: int = 4) -> None:
        """Write ``value`` as ``size`` little-endian bytes of config space at ``offset``."""
        await self.region_write(RegionIndex.CONFIG, offset, value.to_bytes(size, "little"))

    async def enable(self, *, memory: bool = True, io: bool = True, master: bool = True) -> None:
        """Set COMMAND's memory, I/O and bus-master bits to exactly these values; other bits stay.

        What a driver does before touching BARs (memory, I/O) and before
        letting the device DMA or send MSIs (master).
        """
        command = await self.config_read(_PCI_COMMAND, 2)
        for bit, wanted in ((_COMMAND_IO, io), (_COMMAND_MEMORY, memory), (_COMMAND_MASTER, master)):
            command = command | bit if wanted else command & ~bit
        await self.config_write(_PCI_COMMAND, command, 2)

    async def read8(self, index: int, offset: int) -> int:
        """One byte of region ``index`` at ``offset``."""
        return await self._read_int(index, offset, 1)

    async def read16(self, index: int, offset: int) -> int:
        """A little-endian 16-bit value of region ``index`` at ``offset``."""
        return await self._read_int(index, offset, 2)

    async def read32(self, index: int, offset: int) -> int:
        """A little-endian 32-bit value of region ``index`` at ``offset``."""
        return await self._read_int(index, offset, 4)

    async def read64(self, index: int, offset: int) -> int:
        """A little-endian 64-bit value of region ``index`` at ``offset``."""
        return await self._read_int(index, offset, 8)

    async def write8(self, index: int, offset: int, value: int, *, posted: bool = False) -> None:
        """Write one byte; ``posted`` as in :meth:`region_write`."""
        await self.region_write(index, offset, value.to_bytes(1, "little"), posted=posted)

    async def write16(self, index: int, offset: int, value: int, *, posted: bool = False) -> None:
        """Write a little-endian 16-bit value; ``posted`` as in :meth:`region_write`."""
        await self.region_write(index, offset, value.to_bytes(2, "little"), posted=posted)

    async def write32(self, index: int, offset: int, value: int, *, posted: bool = False) -> None:
        """Write a little-endian 32-bit value; ``posted`` as in :meth:`region_write`."""
        await self.region_write(index, offset, value.to_bytes(4, "little"), posted=posted)

    async def write64(self, index: int, offset: int, value: int, *, posted: bool = False) -> None:
        """Write a little-endian 64-bit value; ``posted`` as in :meth:`region_write`."""
        await self.region_write(index, offset, value.to_bytes(8, "little"), posted=posted)

    async def _read_int(self, index: int, offset: int, size: int) -> int:
        return int.from_bytes(await self.region_read(index, offset, size), "little")

    async def map_region(self, index: int) -> MappedRegion:
        """mmap the mappable areas of region ``index`` through the server's fd."""
        info = await self.region_info(index)
        if not info.mmap_areas or not info.fds:
            raise ValueError(f"region {index} offers nothing to mmap ({info.flags!r})")
        mapping = MappedRegion(info)
        self._mappings.append(mapping)
        return mapping

    async def set_irqs(
        self,
        index: int,
        start: int = 0,
        count: int = 1,
        *,
        action: IrqSetFlag = IrqSetFlag.ACTION_TRIGGER,
    ) -> tuple[Interrupt, ...]:
        """Wire interrupts [start, start+count) of type ``index`` to new eventfds.

        With the default action the server signals them when the device
        raises the interrupt; ``await irq.wait()`` sees it.
        """
        interrupts = tuple(Interrupt(index, start + n) for n in range(count))
        fds = tuple(cast(int, irq.fd) for irq in interrupts)
        try:
            await self.request(
                SetIrqsRequest(
                    flags=IrqSetFlag.DATA_EVENTFD | action,
                    index=index,
                    start=start,
                    count=count,
                    fds=fds,
                )
            )
        except BaseException:
            for irq in interrupts:
                irq.close()
            raise
        self._interrupts.extend(interrupts)
        return interrupts

    async def signal_irqs(
        self,
        index: int,
        start: int = 0,
        count: int = 1,
        *,
        action: IrqSetFlag = IrqSetFlag.ACTION_TRIGGER,
        which: Sequence[bool] | None = None,
    ) -> None:
        """Ask the device to trigger, mask or unmask interrupts itself.

        Without ``which`` the action applies to all of them (DATA_NONE); with
        it, only where it is true (DATA_BOOL, one flag per interrupt).
        """
        if which is None:
            flags, data = IrqSetFlag.DATA_NONE | action, b""
        else:
            flags, data = IrqSetFlag.DATA_BOOL | action, bytes(bool(w) for w in which)
        await self.request(SetIrqsRequest(flags=flags, index=index, start=start, count=count, data=data))

    async def disable_irqs(self, index: int, start: int = 0, count: int = 0) -> None:
        """Detach eventfds: all of type ``index`` (``count == 0``) or a range."""
        data_kind = IrqSetFlag.DATA_NONE if count == 0 else IrqSetFlag.DATA_EVENTFD
        await self.request(
            SetIrqsRequest(flags=data_kind | IrqSetFlag.ACTION_TRIGGER, index=index, start=start, count=count)
        )

    async def device_reset(self) -> None:
        await self.request(DeviceResetRequest())

    # --- DMA ----------------------------------------------------------------------

    async def dma_map_memfd(self, iova: int, size: int, *, flags: DmaFlag = DmaFlag.READ | DmaFlag.WRITE) -> DmaRegion:
        """Share a new memfd of ``size`` bytes at ``iova``; the server may mmap it."""
        fd = os.memfd_create("vdev-dma", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            memory = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
        except BaseException:
            os.close(fd)
            raise
        return await self._dma_map(DmaRegion(iova, size, flags, memory, fd))

    async def dma_map_private(
        self, iova: int, size: int, *, flags: DmaFlag = DmaFlag.READ | DmaFlag.WRITE
    ) -> DmaRegion:
        """Offer ``size`` bytes at ``iova`` without an fd: the server must use
        DMA_READ/DMA_WRITE messages, which the client answers."""
        memory = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        return await self._dma_map(DmaRegion(iova, size, flags, memory, None))

    async def dma_unmap(self, region: DmaRegion) -> None:
        """Withdraw ``region``; once the server confirms, its memory is released."""
        await self.request(DmaUnmapRequest(address=region.iova, size=region.size))
        self._dma.remove(region)
        region.close()

    async def _dma_map(self, region: DmaRegion) -> DmaRegion:
        # Registered before the request: the server may DMA as soon as it maps.
        self._dma.append(region)
        fds = () if region.fd is None else (region.fd,)
        try:
            await self.request(DmaMapRequest(address=region.iova, size=region.size, flags=region.flags, fds=fds))
        except BaseException:
            self._dma.remove(region)
            region.close()
            raise
        return region

    # --- raw mode -----------------------------------------------------------------

    async def send_raw(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Write arbitrary bytes (and fds) to the server, unchecked.

        For robustness tests: the bytes need not be a valid message.  Answers
        that no call is waiting for come out of ``receive_raw``.  Pick message
        ids the client is not using (it counts up from 0).
        """
        await self._write(data, fds)

    async def receive_raw(self) -> Message:
        """The next message from the server that no call was waiting for.

        Raises ``ServerDisconnected`` (or ``RemoteProtocolError``) once the
        connection is gone and nothing is left to read.
        """
        try:
            return await self._unsolicited_out.receive()
        except trio.EndOfChannel:
            self._raise_failure()

    async def aclose(self) -> None:
        """Close the connection now; leaving ``connect``'s block does it too."""
        self._receiver.cancel()
        self._release()
        await trio.lowlevel.checkpoint()

    # --- internals ----------------------------------------------------------------

    def _allocate_id(self) -> int:
        self._check_usable()
        for _ in range(0x10000):
            msg_id, self._next_id = self._next_id, (self._next_id + 1) & 0xFFFF
            if msg_id not in self._pending and msg_id not in self._abandoned:
                return msg_id
        raise RuntimeError("all 65536 message ids are waiting for replies")

    def _check_transfer(self, count: int) -> None:
        limit = self.server_capabilities.effective_max_data_xfer_size
        if count > limit:
            raise ValueError(f"{count} bytes exceed the server's max_data_xfer_size of {limit}")

    def _check_usable(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the client is closed")
        if self._failure is not None:
            self._raise_failure()

    def _raise_failure(self) -> NoReturn:
        """Re-raise why the connection ended, as a fresh exception for this caller."""
        if self._closed:
            raise trio.ClosedResourceError("the client is closed")
        failure = self._failure
        if isinstance(failure, RemoteProtocolError):
            raise RemoteProtocolError(str(failure.args[0]), failure.errno) from failure
        if isinstance(failure, trio.BrokenResourceError):
            raise trio.BrokenResourceError(*failure.args) from failure
        cause = None if isinstance(failure, ServerDisconnected) else failure
        raise ServerDisconnected("the server closed the connection") from cause

    async def _send(self, message: Message) -> None:
        data, fds = self._conn.send(message)
        await self._write(data, fds)

    async def _write(self, data: bytes, fds: Sequence[int]) -> None:
        """Write one message's bytes whole, or give the connection up."""
        self._check_usable()
        async with self._send_lock:
            try:
                await self._stream.send(data, fds)
            except OSError as exc:
                self._fail(exc)
                self._raise_failure()
            finally:
                if self._stream.torn:
                    self._fail(
                        trio.BrokenResourceError("a message was cut short by cancellation; the stream is out of sync")
                    )

    async def _hang_up(self) -> None:
        """Half-close the connection and wait, briefly, until the server has closed its end.

        A server notices a client leaving only when it reads the end of the
        stream, in its own time (vdev serves each device from its own
        thread).  Waiting for its close makes "the client has left" mean
        "the server has let it go", which a test inspecting the server right
        afterwards (its open fds, its device's events) relies on.  A server
        that does not close within :data:`HANG_UP_PATIENCE` is left to it.
        """
        if self._closed or self._receive_ended.is_set():
            return
        with trio.move_on_after(HANG_UP_PATIENCE, shield=True):
            try:
                self._stream.shutdown_write()
            except OSError:
                return
            await self._receive_ended.wait()

    async def _receive_loop(self) -> None:
        with self._receiver:
            try:
                while True:
                    data, fds = await self._stream.receive()
                    self._conn.receive_data(data, fds)
                    while (event := self._conn.next_event()) is not NEED_DATA:
                        if isinstance(event, ConnectionClosed):
                            raise ServerDisconnected("the server closed the connection")
                        await self._dispatch(event)
            except RemoteProtocolError as exc:
                _close_fds(exc.fds)
                self._fail(exc)
            except (
                ServerDisconnected,
                OSError,
                trio.ClosedResourceError,
                trio.BrokenResourceError,
            ) as exc:
                self._fail(exc)
            finally:
                self._receive_ended.set()

    async def _dispatch(self, message: Message) -> None:
        if isinstance(message, Reply):
            call = self._pending.get(message.msg_id)
            if call is not None and not call.done.is_set():
                call.reply = message
                call.done.set()
            elif message.msg_id in self._abandoned:
                self._abandoned.discard(message.msg_id)
                _close_fds(message.fds)
            else:
                self._unsolicited_in.send_nowait(message)
            return
        reply = self._serve(message)
        if not cast(Request[Any], message).no_reply:
            await self._send(reply)

    def _serve(self, request: Message) -> Reply:
        """Answer a server-to-client command from the DMA regions."""
        _close_fds(request.fds)
        match request:
            case DmaReadRequest(address=address, count=count):
                region = self._find_dma(address, count)
                if region is None:
                    return ErrorReply(command=request.command, msg_id=request.msg_id, errno=EFAULT)
                if not region.flags & DmaFlag.READ:
                    return ErrorReply(command=request.command, msg_id=request.msg_id, errno=EPERM)
                data = region.serve_read(address, count)
                return DmaReadReply(msg_id=request.msg_id, address=address, data=data)
            case DmaWriteRequest(address=address, data=data):
                region = self._find_dma(address, len(data))
                if region is None:
                    return ErrorReply(command=request.command, msg_id=request.msg_id, errno=EFAULT)
                if not region.flags & DmaFlag.WRITE:
                    return ErrorReply(command=request.command, msg_id=request.msg_id, errno=EPERM)
                region.serve_write(address, data)
                return DmaWriteReply(msg_id=request.msg_id, address=address, count=len(data))
            case _:
                return ErrorReply(command=request.command, msg_id=request.msg_id, errno=EINVAL)

    def _find_dma(self, address: int, count: int) -> DmaRegion | None:
        for region in self._dma:
            if region.covers(address, count):
                return region
        return None

    def _fail(self, failure: BaseException) -> None:
        """The connection is over: wake every waiter, refuse every later call."""
        if self._failure is None:
            self._failure = failure
        for call in self._pending.values():
            call.done.set()
        self._unsolicited_in.close()

    def _release(self) -> None:
        """Close the socket and everything the connection handed out (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._fail(trio.ClosedResourceError("the client is closed"))
        self._stream.close()
        for region in self._dma:
            region.close()
        for interrupt in self._interrupts:
            interrupt.close()
        for mapping in self._mappings:
            mapping.close()
        _close_fds(self._owned_fds)
        self._dma.clear()
        self._interrupts.clear()
        self._mappings.clear()
        self._owned_fds.clear()


def _close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        os.close(fd)
