"""VERSION's JSON capabilities: defaults, verbatim unknowns, the NUL terminator."""

from __future__ import annotations

import json

import pytest

from vdev.protocol import (
    DEFAULT_MAX_DATA_XFER_SIZE,
    DEFAULT_MAX_MSG_FDS,
    Capabilities,
    MigrationCapability,
    RemoteProtocolError,
    TwinSocket,
)
from vdev.protocol.capabilities import decode_version_data, encode_version_data


def test_absent_capabilities_mean_the_spec_defaults() -> None:
    caps = Capabilities()
    assert caps.effective_max_msg_fds == DEFAULT_MAX_MSG_FDS == 1
    assert caps.effective_max_data_xfer_size == DEFAULT_MAX_DATA_XFER_SIZE == 1 << 20
    assert caps.to_json() == {}


def test_encoding_is_compact_json_with_a_nul() -> None:
    data = encode_version_data(Capabilities(max_msg_fds=8, write_multiple=False))
    assert data == b'{"capabilities":{"max_msg_fds":8,"write_multiple":false}}\0'


def test_what_libvfio_user_sends_decodes() -> None:
    data = b'{"capabilities":{"max_msg_fds":8,"max_data_xfer_size":1048576,"migration":{"pgsize":4096}}}\0'
    assert decode_version_data(data) == Capabilities(
        max_msg_fds=8, max_data_xfer_size=1048576, migration=MigrationCapability(pgsize=4096)
    )


def test_unknown_capabilities_survive_a_round_trip() -> None:
    caps = Capabilities(
        twin_socket=TwinSocket(supported=True, fd_index=0),
        extra={"future": {"nested": [1, "two"]}, "flag": True},
    )
    decoded = decode_version_data(encode_version_data(caps))
    assert decoded == caps
    assert json.loads(encode_version_data(decoded)[:-1])["capabilities"]["future"] == {"nested": [1, "two"]}


def test_json_without_capabilities_is_an_empty_set() -> None:
    assert decode_version_data(b'{"other":1}\0') == Capabilities()


def test_twin_socket_supported_defaults_to_false() -> None:
    caps = decode_version_data(b'{"capabilities":{"twin_socket":{}}}\0')
    assert caps.twin_socket == TwinSocket(supported=False, fd_index=None)


@pytest.mark.parametrize(
    "data",
    [
        b'{"capabilities":{}}',
        b'{"capabilities":{"pgsizes":4096.0}}\0',
        b'{"capabilities":{"max_dma_maps":"many"}}\0',
        b'{"capabilities":{"migration":4096}}\0',
        b'{"capabilities":{"migration":{"pgsize":false}}}\0',
        b'{"capabilities":{"twin_socket":{"supported":"yes"}}}\0',
    ],
)
def test_ill_typed_or_unterminated_json_is_rejected(data: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        decode_version_data(data)
