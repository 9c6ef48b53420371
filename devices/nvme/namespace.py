"""Namespaces: logical blocks kept in a sparse memfd (the default) or in a file.

A namespace is bytes at ``lba * block_size`` of its backing file; the
controller reads and writes it with ``pread``/``pwrite`` on the fd, so a
test (or a person with ``cmp``) can check exactly what the guest stored.
Deallocation and Write Zeroes punch holes, so a memfd stays as sparse as
what was written and reads of deallocated blocks return zeroes, which is
what the namespace advertises (DLFEAT).
"""

from __future__ import annotations

import ctypes
import errno
import os
import uuid
from pathlib import Path

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
SEEK_DATA = getattr(os, "SEEK_DATA", 3)
SEEK_HOLE = getattr(os, "SEEK_HOLE", 4)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
_libc.fallocate.restype = ctypes.c_int


class Namespace:
    """One namespace: its identity, geometry and backing store.

    ``backing`` is a file path (created with ``size`` bytes if missing; an
    existing file keeps its size, rounded down to whole blocks) or ``None``
    for an anonymous sparse memfd of ``size`` bytes.
    """

    def __init__(self, nsid: int, size: int, block_size: int, *, backing: str | None, identity: str) -> None:
        if block_size not in (512, 4096):
            raise ValueError(f"block size must be 512 or 4096, not {block_size}")
        self.nsid = nsid
        self.block_size = block_size
        self.lba_shift = block_size.bit_length() - 1
        self.path = Path(backing) if backing else None
        if self.path is None:
            self.fd = os.memfd_create(f"vdev-nvme-ns{nsid}", os.MFD_CLOEXEC)
            os.ftruncate(self.fd, size)
        else:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            if os.fstat(self.fd).st_size == 0:
                os.ftruncate(self.fd, size)
        self.blocks = os.fstat(self.fd).st_size // block_size
        if self.blocks == 0:
            os.close(self.fd)
            raise ValueError(f"namespace {nsid} would have no blocks ({size} bytes, {block_size}-byte blocks)")
        name = uuid.uuid5(uuid.NAMESPACE_URL, f"vdev-nvme:{identity}:{nsid}")
        #: Globally unique identifiers, derived from the controller's serial so that they repeat run to run.
        self.uuid = name.bytes
        self.nguid = name.bytes
        self.eui64 = name.bytes[:8]

    @property
    def size(self) -> int:
        return self.blocks * self.block_size

    def contains(self, lba: int, count: int) -> bool:
        return lba >= 0 and count >= 0 and lba + count <= self.blocks

    def read(self, lba: int, count: int) -> bytes:
        """``count`` blocks at ``lba``."""
        length = count << self.lba_shift
        data = os.pread(self.fd, length, lba << self.lba_shift)
        return data if len(data) == length else data.ljust(length, b"\0")

    def write(self, lba: int, data: bytes | memoryview) -> None:
        """Store whole blocks of ``data`` at ``lba``."""
        offset = lba << self.lba_shift
        view = memoryview(data)
        while view:
            written = os.pwrite(self.fd, view, offset)
            view, offset = view[written:], offset + written

    def zero(self, lba: int, count: int) -> None:
        """Make ``count`` blocks at ``lba`` read as zeroes, releasing their storage where the file allows."""
        offset, length = lba << self.lba_shift, count << self.lba_shift
        if _libc.fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.EOPNOTSUPP, errno.ENOSYS):
            raise OSError(code, os.strerror(code))
        chunk = bytes(min(length, 1 << 20))
        while length:
            step = min(length, len(chunk))
            os.pwrite(self.fd, chunk[:step], offset)
            offset, length = offset + step, length - step

    def flush(self) -> None:
        """Make written blocks durable (a no-op for memory, ``fdatasync`` for a file)."""
        if self.path is not None:
            os.fdatasync(self.fd)

    def allocated_blocks(self) -> int:
        """Blocks backed by storage (not holes): the namespace's utilisation."""
        allocated, position, end = 0, 0, self.size
        while position < end:
            try:
                start = os.lseek(self.fd, position, SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:
                    break
                raise
            stop = os.lseek(self.fd, start, SEEK_HOLE)
            allocated += min(stop, end) - start
            position = stop
        return (allocated + self.block_size - 1) >> self.lba_shift

    def resize(self, size: int) -> None:
        """Change the capacity to ``size`` bytes (whole blocks); what lies beyond a shrink is dropped."""
        blocks = size // self.block_size
        if blocks <= 0:
            raise ValueError(f"namespace {self.nsid} cannot shrink to {size} bytes")
        os.ftruncate(self.fd, blocks * self.block_size)
        self.blocks = blocks

    def contents(self, offset: int = 0, length: int | None = None) -> bytes:
        """The stored bytes (for tests and tools): ``length`` bytes from ``offset``, default all."""
        length = self.size - offset if length is None else length
        return os.pread(self.fd, length, offset)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
