"""A property-based fuzzer over vfio-user message fields, against ``vdev serve`` in its own process.

Each example is one connection: VERSION, then a message whose header fields
and payload hypothesis chooses (commands weighted toward the real ones,
sizes toward the edges).  Whatever the message, the server must answer it,
refuse it or close the connection — and the next well-behaved client must be
served.  The server runs as a real ``vdev serve`` process so that a crash is
a crash, not an exception in the test.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.requires("libvfio-user")

HEADER = struct.Struct("=HHIII")
VERSION_REQUEST = HEADER.pack(1, 1, 16 + 4 + 3, 0, 0) + struct.pack("=HH", 0, 1) + b"{}\0"


@pytest.fixture(scope="module")
def edu_server() -> Iterator[tuple[Path, subprocess.Popen[bytes]]]:
    with tempfile.TemporaryDirectory(prefix="vdev-fuzz-") as directory:
        path = Path(directory) / "edu.sock"
        server = subprocess.Popen(
            [sys.executable, "-m", "vdev", "serve", "edu", "--socket-path", str(path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while not path.exists():
            assert server.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        yield path, server
        server.terminate()
        assert server.wait(timeout=10) == 0


def receive_message(connection: socket.socket) -> tuple[int, int, bytes] | None:
    """(command, flags, payload) of the next message, or None if the server closed the connection."""
    header = b""
    while len(header) < HEADER.size:
        chunk = connection.recv(HEADER.size - len(header))
        if not chunk:
            return None
        header += chunk
    _msg_id, command, size, flags, _error = HEADER.unpack(header)
    body = b""
    while len(body) < size - HEADER.size:
        chunk = connection.recv(size - HEADER.size - len(body))
        if not chunk:
            return None
        body += chunk
    return command, flags, body


def connect(path: Path) -> socket.socket:
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    connection.settimeout(5)
    for _ in range(200):
        try:
            connection.connect(str(path))
            break
        except (ConnectionRefusedError, FileNotFoundError):
            time.sleep(0.01)
    connection.sendall(VERSION_REQUEST)
    reply = receive_message(connection)
    assert reply is not None and reply[0] == 1 and not reply[1] & 0x20
    return connection


commands = st.one_of(st.integers(1, 18), st.integers(0, 0xFFFF))
flag_values = st.one_of(st.sampled_from([0, 1, 0x10, 0x20, 0x21]), st.integers(0, 0xFFFF_FFFF))
payloads = st.binary(max_size=256)


@settings(
    max_examples=int(os.environ.get("VDEV_FUZZ_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    command=commands,
    flags=flag_values,
    payload=payloads,
    size_delta=st.sampled_from([0, 0, 0, -1, 1, -16, 64]),
    msg_id=st.integers(0, 0xFFFF),
)
def test_fuzzed_messages_never_break_the_server(
    edu_server: tuple[Path, subprocess.Popen[bytes]],
    command: int,
    flags: int,
    payload: bytes,
    size_delta: int,
    msg_id: int,
) -> None:
    path, server = edu_server
    size = max(0, HEADER.size + len(payload) + size_delta)
    with connect(path) as connection:
        connection.sendall(HEADER.pack(msg_id, command, size, flags, 0) + payload)
        connection.settimeout(0.2)
        try:
            receive_message(connection)
        except (TimeoutError, ConnectionResetError):
            pass
    assert server.poll() is None, "the server died"
    with connect(path) as healthy:
        healthy.sendall(HEADER.pack(2, 9, 16 + 16, 0, 0) + struct.pack("=QII", 0, 7, 4))
        reply = receive_message(healthy)
        assert reply is not None and reply[2][16:] == struct.pack("<HH", 0x1234, 0x11E8)
