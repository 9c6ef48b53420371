"""The memfd behind mapped areas: revoke faults every mapping, restore brings the contents back."""

from __future__ import annotations

import mmap
import signal
import subprocess
import sys

from vdev.model.memory import MappedMemory
from vdev.testing.memory import resident_pages

# A client: maps the memfd once, then reads 4 bytes at each offset it is sent.
CLIENT = """
import mmap, sys
fd, size = int(sys.argv[1]), int(sys.argv[2])
view = mmap.mmap(fd, size)
for line in sys.stdin:
    offset = int(line)
    sys.stdout.write(view[offset:offset + 4].hex() + "\\n")
    sys.stdout.flush()
"""


def start_client(memory: MappedMemory) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", CLIENT, str(memory.fd), str(memory.size)],
        pass_fds=[memory.fd],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def touch(client: subprocess.Popen[str], offset: int) -> str:
    assert client.stdin is not None and client.stdout is not None
    client.stdin.write(f"{offset}\n")
    client.stdin.flush()
    return client.stdout.readline().strip()


def test_revoked_memory_kills_a_process_that_touches_its_mapping() -> None:
    memory = MappedMemory("test", 1 << 20)
    memory.view[0x2000:0x2004] = b"\xde\xad\xbe\xef"
    mapped_before = start_client(memory)
    assert touch(mapped_before, 0x2000) == "deadbeef"
    memory.revoke(keep_contents=True)
    touch(mapped_before, 0x2000)
    assert mapped_before.wait(timeout=30) == -signal.SIGBUS
    memory.restore(populate=False)
    mapped_after = start_client(memory)
    assert touch(mapped_after, 0x2000) == "deadbeef"
    mapped_after.kill()
    mapped_after.wait()
    memory.close()


def test_revoke_saves_only_pages_with_data() -> None:
    memory = MappedMemory("test", 64 << 20)
    memory.view[0:1] = b"\x01"
    memory.view[(32 << 20) : (32 << 20) + 1] = b"\x02"
    assert memory.revoke(keep_contents=True) == 2 * mmap.PAGESIZE
    memory.restore(populate=False)
    assert memory.resident_pages() == 2
    assert memory.view[0] == 1 and memory.view[32 << 20] == 2
    memory.close()


def test_discard_loses_contents_and_populate_makes_all_pages_resident() -> None:
    memory = MappedMemory("test", 4 << 20)
    memory.view[0:4] = b"abcd"
    memory.revoke(keep_contents=False)
    memory.restore(populate=True)
    assert memory.view[0:4] == bytes(4)
    assert memory.resident_pages() == resident_pages(memory.view) == (4 << 20) // mmap.PAGESIZE
    memory.close()
