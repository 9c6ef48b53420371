"""Direct access to a device region through the fd the server handed out."""

from __future__ import annotations

import mmap

from vdev.client._info import RegionInfo


class MappedRegion:
    """The mmap-able areas of one region, addressed by region offset.

    Reads and writes go straight to the server's memory, bypassing the
    socket, as a VMM's guest would; an access outside every mapped area is
    refused rather than silently redirected to REGION_READ/WRITE.
    """

    def __init__(self, info: RegionInfo) -> None:
        self.info = info
        self._maps: list[tuple[int, int, mmap.mmap]] = []  # (start, end, map)
        prot = (mmap.PROT_READ if info.readable else 0) | (mmap.PROT_WRITE if info.writable else 0)
        areas = info.mmap_areas
        try:
            for number, area in enumerate(areas):
                # The spec (and QEMU) have one fd per region; libvfio-user
                # without vdev's patch 0001 sends one per sparse area.  Both
                # are honoured.
                fd = info.fds[number] if len(info.fds) == len(areas) else info.fds[0]
                offset = info.offset + area.offset
                memory = mmap.mmap(fd, area.size, flags=mmap.MAP_SHARED, prot=prot, offset=offset)
                self._maps.append((area.offset, area.offset + area.size, memory))
        except BaseException:
            self.close()
            raise

    def __repr__(self) -> str:
        areas = ", ".join(f"[{start:#x}, {end:#x})" for start, end, _ in self._maps)
        return f"<MappedRegion {self.info.index}: {areas}>"

    @property
    def areas(self) -> list[tuple[int, mmap.mmap]]:
        """``(region offset, mapping)`` of every mapped area, for tools that need the raw mmap
        (``mincore``, first-touch timing)."""
        return [(start, memory) for start, _end, memory in self._maps]

    def read(self, offset: int, count: int) -> bytes:
        """``count`` bytes at region offset ``offset``, read through the mapping."""
        start, memory = self._locate(offset, count)
        return memory[offset - start : offset - start + count]

    def write(self, offset: int, data: bytes) -> None:
        """Store ``data`` at region offset ``offset`` through the mapping."""
        start, memory = self._locate(offset, len(data))
        memory[offset - start : offset - start + len(data)] = data

    def close(self) -> None:
        for _start, _end, memory in self._maps:
            memory.close()
        self._maps.clear()

    def _locate(self, offset: int, count: int) -> tuple[int, mmap.mmap]:
        for start, end, memory in self._maps:
            if start <= offset and offset + count <= end:
                return start, memory
        raise ValueError(
            f"[{offset:#x}, {offset + count:#x}) of region {self.info.index} is not inside one mapped area"
        )
