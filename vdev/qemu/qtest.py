"""A client for QEMU's qtest protocol, over any Trio stream.

qtest lets a test drive a machine without a guest CPU: the test reads and
writes guest-physical memory and I/O ports, and watches interrupt lines.  The
protocol rules this module relies on (QEMU's ``system/qtest.c``):

* Text lines ending in ``\\n``, one command per line, words separated by one
  space.  Numbers are accepted in any C base; we always send ``0x`` hex.
* Every command gets exactly one reply line, in order: ``OK`` optionally
  followed by values, or ``FAIL ...`` / ``ERR ...``.
* Asynchronous ``IRQ raise N`` / ``IRQ lower N`` lines may arrive at any time,
  also between a command and its reply, once ``irq_intercept_in`` was sent.
  QEMU only reports changes of level.
* A malformed command makes QEMU abort (it asserts), so values are checked
  here, before they are sent.

Because IRQ lines arrive unrequested, one task, :meth:`QTestClient.run`, owns
the receiving side: it routes replies to the command waiting for them and
folds IRQ lines into the interrupt state.

Example (a stream connected to QEMU's ``-qtest`` socket)::

    qtest = QTestClient(stream)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(qtest.run)
        await qtest.writel(0x1000, 0xCAFE)
        assert await qtest.readl(0x1000) == 0xCAFE
        await qtest.aclose()
"""

from __future__ import annotations

import base64
import collections
import math

import trio

from vdev.qemu.errors import QTestClosedError, QTestError

_ACCESS_SUFFIX = {1: "b", 2: "w", 4: "l", 8: "q"}
_RECEIVE_SIZE = 65536


def _hex(value: int) -> str:
    return f"{value:#x}"


def _check_uint(value: int, bits: int, what: str) -> None:
    if not 0 <= value < 1 << bits:
        raise ValueError(f"{what} {value:#x} does not fit in {bits} unsigned bits")


def _check_word(word: str) -> None:
    if not word or not word.isascii() or any(ch.isspace() for ch in word):
        raise ValueError(f"qtest arguments must be non-empty ASCII without whitespace: {word!r}")


class _LineReader:
    """Splits a byte stream into lines, remembering how far it already searched.

    Remembering the searched prefix keeps a long reply (a large ``b64read``)
    that arrives in many chunks linear to frame, instead of quadratic.
    """

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buffer = bytearray()
        self._searched = 0

    async def readline(self) -> bytes | None:
        """The next line without its ``\\n``; ``None`` at end of stream."""
        while True:
            end = self._buffer.find(b"\n", self._searched)
            if end >= 0:
                line = bytes(self._buffer[:end])
                del self._buffer[: end + 1]
                self._searched = 0
                return line
            self._searched = len(self._buffer)
            chunk = await self._stream.receive_some(_RECEIVE_SIZE)
            if not chunk:
                return None
            self._buffer += chunk


class QTestClient:
    """Drives QEMU's qtest protocol over a connected stream.

    :meth:`run` must be running in some task for commands to get their
    replies; :class:`~vdev.qemu.QemuMachine` does that for its client.
    Commands may be issued from several tasks: they are serialised, because
    the protocol matches replies to commands only by order.
    """

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream
        self._lines = _LineReader(stream)
        self._send_reply, self._replies = trio.open_memory_channel[str](math.inf)
        self._command_lock = trio.Lock()
        # Replies still owed, including those of commands whose callers were
        # cancelled while waiting: the next command discards them first.
        self._owed_replies = 0
        self._broken: str | None = None
        self._running = False
        self._finished = False
        self._peer_closed = False
        self._irq_levels: dict[int, bool] = {}
        self._irq_edges: collections.Counter[tuple[int, bool]] = collections.Counter()
        self._irq_changed = trio.Event()

    async def run(self) -> None:
        """Receive and route QEMU's lines until the stream ends or is closed.

        Returns normally at end of stream; from then on commands and IRQ
        waits raise :class:`QTestClosedError`.
        """
        if self._running:
            raise RuntimeError("QTestClient.run() is already running")
        self._running = True
        try:
            while (line := await self._lines.readline()) is not None:
                self._dispatch(line.decode("ascii", errors="replace"))
            self._peer_closed = True
        except trio.BrokenResourceError:
            self._peer_closed = True
        except trio.ClosedResourceError:
            pass  # closed on our side, by aclose()
        finally:
            self._finished = True
            self._send_reply.close()
            self._notify_irq_change()

    @property
    def peer_closed(self) -> bool:
        """Whether QEMU closed the stream: a sign that QEMU is exiting."""
        return self._peer_closed

    async def aclose(self) -> None:
        """Close the stream; pending and later commands raise :class:`QTestClosedError`."""
        self._broken = "the qtest client was closed"
        await self._stream.aclose()

    def _dispatch(self, line: str) -> None:
        words = line.split()
        if len(words) == 3 and words[0] == "IRQ" and words[1] in ("raise", "lower"):
            num = int(words[2], 0)
            raised = words[1] == "raise"
            self._irq_levels[num] = raised
            self._irq_edges[num, raised] += 1
            self._notify_irq_change()
        else:
            self._send_reply.send_nowait(line)

    def _notify_irq_change(self) -> None:
        self._irq_changed.set()
        self._irq_changed = trio.Event()

    # -- commands -------------------------------------------------------------

    async def command(self, *words: str) -> list[str]:
        """Send one raw qtest command; return the words after ``OK``.

        Raises :class:`QTestError` for ``FAIL``/``ERR`` replies and
        :class:`QTestClosedError` once the stream is gone.
        """
        for word in words:
            _check_word(word)
        line = " ".join(words)
        async with self._command_lock:
            if self._broken is not None:
                raise QTestClosedError(self._broken)
            try:
                await self._stream.send_all(line.encode("ascii") + b"\n")
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise QTestClosedError(f"qtest stream closed while sending {line!r}") from exc
            except BaseException:
                # A send interrupted half-way leaves an unknown part of the line
                # on the wire; nothing after it could be trusted.
                self._broken = f"sending {line!r} was interrupted"
                raise
            self._owed_replies += 1
            while self._owed_replies:
                try:
                    reply = await self._replies.receive()
                except trio.EndOfChannel:
                    raise QTestClosedError(f"qtest stream closed before QEMU answered {line!r}") from None
                self._owed_replies -= 1
        if reply == "OK" or reply.startswith("OK "):
            return reply.split()[1:]
        raise QTestError(line, reply)

    async def _value_command(self, *words: str) -> int:
        reply = await self.command(*words)
        return int(reply[0], 16)

    async def _read(self, addr: int, size: int) -> int:
        _check_uint(addr, 64, "address")
        return await self._value_command(f"read{_ACCESS_SUFFIX[size]}", _hex(addr))

    async def _write(self, addr: int, value: int, size: int) -> None:
        _check_uint(addr, 64, "address")
        _check_uint(value, size * 8, "value")
        await self.command(f"write{_ACCESS_SUFFIX[size]}", _hex(addr), _hex(value))

    async def _in(self, port: int, size: int) -> int:
        _check_uint(port, 16, "I/O port")
        return await self._value_command(f"in{_ACCESS_SUFFIX[size]}", _hex(port))

    async def _out(self, port: int, value: int, size: int) -> None:
        _check_uint(port, 16, "I/O port")
        _check_uint(value, size * 8, "value")
        await self.command(f"out{_ACCESS_SUFFIX[size]}", _hex(port), _hex(value))

    async def read(self, addr: int, size: int) -> int:
        """Read a little-endian value of ``size`` bytes (1, 2, 4 or 8) of guest memory."""
        if size not in _ACCESS_SUFFIX:
            raise ValueError(f"memory access size must be 1, 2, 4 or 8, not {size}")
        return await self._read(addr, size)

    async def write(self, addr: int, value: int, size: int) -> None:
        """Write a little-endian value of ``size`` bytes (1, 2, 4 or 8) to guest memory."""
        if size not in _ACCESS_SUFFIX:
            raise ValueError(f"memory access size must be 1, 2, 4 or 8, not {size}")
        await self._write(addr, value, size)

    async def readb(self, addr: int) -> int:
        """Read one byte of guest-physical memory."""
        return await self._read(addr, 1)

    async def readw(self, addr: int) -> int:
        """Read a 16-bit little-endian value of guest-physical memory."""
        return await self._read(addr, 2)

    async def readl(self, addr: int) -> int:
        """Read a 32-bit little-endian value of guest-physical memory."""
        return await self._read(addr, 4)

    async def readq(self, addr: int) -> int:
        """Read a 64-bit little-endian value of guest-physical memory."""
        return await self._read(addr, 8)

    async def writeb(self, addr: int, value: int) -> None:
        """Write one byte of guest-physical memory."""
        await self._write(addr, value, 1)

    async def writew(self, addr: int, value: int) -> None:
        """Write a 16-bit little-endian value to guest-physical memory."""
        await self._write(addr, value, 2)

    async def writel(self, addr: int, value: int) -> None:
        """Write a 32-bit little-endian value to guest-physical memory."""
        await self._write(addr, value, 4)

    async def writeq(self, addr: int, value: int) -> None:
        """Write a 64-bit little-endian value to guest-physical memory."""
        await self._write(addr, value, 8)

    async def port_read(self, port: int, size: int) -> int:
        """Read ``size`` bytes (1, 2 or 4: x86 has no 8-byte port I/O) from an I/O port."""
        if size not in (1, 2, 4):
            raise ValueError(f"port I/O size must be 1, 2 or 4, not {size}")
        return await self._in(port, size)

    async def port_write(self, port: int, value: int, size: int) -> None:
        """Write ``size`` bytes (1, 2 or 4) to an I/O port."""
        if size not in (1, 2, 4):
            raise ValueError(f"port I/O size must be 1, 2 or 4, not {size}")
        await self._out(port, value, size)

    async def inb(self, port: int) -> int:
        """Read one byte from an I/O port."""
        return await self._in(port, 1)

    async def inw(self, port: int) -> int:
        """Read 16 bits from an I/O port."""
        return await self._in(port, 2)

    async def inl(self, port: int) -> int:
        """Read 32 bits from an I/O port."""
        return await self._in(port, 4)

    async def outb(self, port: int, value: int) -> None:
        """Write one byte to an I/O port."""
        await self._out(port, value, 1)

    async def outw(self, port: int, value: int) -> None:
        """Write 16 bits to an I/O port."""
        await self._out(port, value, 2)

    async def outl(self, port: int, value: int) -> None:
        """Write 32 bits to an I/O port."""
        await self._out(port, value, 4)

    async def memread(self, addr: int, size: int) -> bytes:
        """Read ``size`` bytes of guest-physical memory (base64 on the wire)."""
        _check_uint(addr, 64, "address")
        if size < 0:
            raise ValueError(f"size must not be negative, not {size}")
        if size == 0:
            return b""
        reply = await self.command("b64read", _hex(addr), _hex(size))
        return base64.b64decode(reply[0])

    async def memwrite(self, addr: int, data: bytes) -> None:
        """Write ``data`` to guest-physical memory (base64 on the wire)."""
        _check_uint(addr, 64, "address")
        if not data:
            return
        encoded = base64.b64encode(data).decode("ascii")
        await self.command("b64write", _hex(addr), _hex(len(data)), encoded)

    async def memset(self, addr: int, size: int, value: int = 0) -> None:
        """Fill ``size`` bytes of guest-physical memory with the byte ``value``."""
        _check_uint(addr, 64, "address")
        _check_uint(value, 8, "fill byte")
        if size < 0:
            raise ValueError(f"size must not be negative, not {size}")
        await self.command("memset", _hex(addr), _hex(size), _hex(value))

    async def clock_step(self, ns: int | None = None) -> int:
        """Advance the virtual clock by ``ns``, or to the next timer deadline.

        Under qtest the virtual clock only moves when told to, so device
        timers (edu's DMA, for one) fire only after this.  Returns the new
        clock value in nanoseconds.
        """
        words = ["clock_step"] if ns is None else ["clock_step", str(ns)]
        reply = await self.command(*words)
        return int(reply[0], 0)

    # -- interrupts -------------------------------------------------------------

    async def irq_intercept_in(self, qom_path: str) -> None:
        """Report the input GPIO lines of the device at ``qom_path`` as IRQ lines.

        On x86 machines ``"ioapic"`` makes line numbers the I/O APIC's GSIs.
        QEMU supports one intercepted device per machine.
        """
        await self.command("irq_intercept_in", qom_path)

    def get_irq(self, num: int) -> bool:
        """Whether intercepted line ``num`` is currently raised, as last reported."""
        return self._irq_levels.get(num, False)

    async def settle(self) -> None:
        """Return once QEMU has handled every event that was pending when the last command returned.

        An IRQ line can change just *after* a command's reply: QEMU's
        vfio-pci lowers INTx at every BAR access (its EOI emulation) and
        raises it again when the device signals the eventfd it is handed
        on unmask — which QEMU reads in its next main-loop iteration, not
        in the access.  Two round trips cover that: the first may be
        answered in the very iteration that reads the eventfd, the second
        only after it, and the IRQ report precedes that reply on the stream.
        """
        for _ in range(2):
            await self.command("endianness")

    async def wait_irq(self, num: int, *, raised: bool = True) -> None:
        """Wait until line ``num`` is at the wanted level, or passed through it.

        A pulse (raise then lower) seen after the call counts as reaching
        ``raised=True`` even when the line is already low again.  There is no
        timeout here: wrap the call in :func:`trio.fail_after`.
        """
        edges_before = self._irq_edges[num, raised]
        while self.get_irq(num) != raised and self._irq_edges[num, raised] == edges_before:
            if self._finished:
                raise QTestClosedError(f"qtest stream closed while waiting for IRQ {num}")
            await self._irq_changed.wait()
