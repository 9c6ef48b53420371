"""Seeded fuzzing: whatever bytes arrive, the codec answers with messages or a
``RemoteProtocolError`` — never with another exception.  (A stand-in for a
hypothesis strategy, which the project does not depend on.)"""

from __future__ import annotations

import random
import struct

import pytest

from vdev.protocol import (
    HEADER_SIZE,
    NEED_DATA,
    Connection,
    ConnectionClosed,
    Message,
    RemoteProtocolError,
)

from .test_messages import SAMPLES


def _mutate(rng: random.Random, wire: bytes) -> bytes:
    data = bytearray(wire)
    for _ in range(rng.randint(1, 4)):
        position = rng.randrange(len(data))
        data[position] = rng.randrange(256)
    if rng.random() < 0.3:
        del data[rng.randrange(HEADER_SIZE, len(data) + 1) :]
    # Keep the size field honest half the time, so payload decoders get
    # exercised rather than the framing alone.
    if rng.random() < 0.5:
        struct.pack_into("=I", data, 4, len(data))
    return bytes(data)


def _consume(conn: Connection) -> None:
    while True:
        try:
            event = conn.next_event()
        except RemoteProtocolError as exc:
            if exc.header is None:
                return
            continue
        if event is NEED_DATA or isinstance(event, ConnectionClosed):
            return
        assert isinstance(event, Message)


@pytest.mark.parametrize("seed", range(20))
def test_mutated_messages_never_escape_as_other_errors(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(200):
        conn = Connection(max_message_size=1 << 16)
        wire = _mutate(rng, rng.choice(SAMPLES).encode())
        step = rng.randint(1, 64)
        for start in range(0, len(wire), step):
            conn.receive_data(wire[start : start + step])
        conn.receive_data(b"")
        _consume(conn)


@pytest.mark.parametrize("seed", range(5))
def test_random_noise_never_escapes_as_other_errors(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(200):
        conn = Connection(max_message_size=1 << 16)
        conn.receive_data(rng.randbytes(rng.randint(1, 200)))
        _consume(conn)
