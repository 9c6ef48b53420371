"""Recording sessions through the proxy and replaying them: QEMU sessions, DMA, the CLI and the docs.

A QEMU qtest session with ``Hello`` — realize, configuration walk, BAR
sizing and programming, register reads and writes — is recorded through
the proxy, then replayed against a fresh ``Hello`` (no divergence) and
against ``Impostor``, whose id register differs (a divergence exactly at the
reply QEMU got for that register).
"""

from __future__ import annotations

import functools
import io
import json
import os
import re
import signal
import sys
from pathlib import Path

import pytest
import trio

from tests.proxy.support import (
    HELLO_ID_VALUE,
    HELLO_IDS,
    Impostor,
    behind_proxy,
    enable_memory,
)
from vdev.client import Client, Interrupt
from vdev.protocol import Header, IrqIndex, RegionReadReply
from vdev.proxy import (
    Direction,
    Divergence,
    Record,
    compare_records,
    load_transcript,
    read_transcript,
    replay,
)
from vdev.proxy._fds import FdInfo
from vdev.qemu import QemuMachine
from vdev.testing import served, vfio_user_pci
from vdev_devices.edu import Edu
from vdev_devices.hello import Hello

DOC = Path(__file__).resolve().parents[2] / "docs" / "record-replay.md"
VDEV = [sys.executable, "-m", "vdev"]


async def record_qemu_session(directory: Path) -> Path:
    """A Hello session driven by QEMU in qtest mode, recorded through the proxy."""
    path = directory / "hello-qemu.jsonl"
    with open(path, "w", encoding="utf-8") as transcript:  # noqa: ASYNC230 - a local file, once
        async with behind_proxy(directory, Hello(), transcript=transcript) as setup:
            async with QemuMachine(devices=[vfio_user_pci(setup.proxy_path)]) as vm:
                function = await (await vm.pci_bus()).find(*HELLO_IDS)
                assert await function.find_capability(0x05) is not None  # MSI, through the capability list
                await function.map_bars()
                await function.enable(memory=True, io=False, master=False)
                assert await function.bar_readl(0, 0x00) == HELLO_ID_VALUE
                await function.bar_writel(0, 0x04, 0xA5A5_5A5A)
                assert await function.bar_readl(0, 0x04) == 0xA5A5_5A5A
                assert await function.bar_readl(0, 0x08) == 1
    return path


def first_id_reply(records: list[Record]) -> Record:
    return next(
        r
        for r in records
        if r.type == "RegionReadReply"
        and r.payload is not None
        and (r.payload["region"], r.payload["offset"]) == (0, 0)
    )


@pytest.mark.requires("qemu", "libvfio-user")
async def test_a_qemu_session_replays_without_divergence_and_catches_a_changed_device(
    vdev_socket_dir: Path,
) -> None:
    path = await record_qemu_session(vdev_socket_dir)
    records = load_transcript(path)

    # What QEMU's realize and the test's accesses put on the wire, fds included.
    commands = [r.describe().split()[0] for r in records if r.direction is Direction.TO_SERVER]
    assert commands[0] == "VERSION"
    for command in ("DEVICE_GET_INFO", "DEVICE_GET_REGION_INFO", "DEVICE_GET_IRQ_INFO", "DMA_MAP", "REGION_WRITE"):
        assert command in commands
    fd_kinds = {(r.describe().split()[0], fd.kind) for r in records for fd in r.fds}
    assert ("DMA_MAP", "memfd") in fd_kinds and ("DEVICE_SET_IRQS", "eventfd") in fd_kinds
    guest_ram = next(fd for r in records for fd in r.fds if fd.kind == "memfd")
    assert guest_ram.size == 128 << 20
    assert [r.index for r in records] == list(range(len(records)))

    async with served(Hello(), vdev_socket_dir / "again.sock"):
        result = await replay(path, vdev_socket_dir / "again.sock")
    assert result.ok, result.divergence
    assert result.connections == 1
    assert result.compared == sum(1 for r in records if r.direction is Direction.TO_CLIENT)

    async with served(Impostor(), vdev_socket_dir / "impostor.sock"):
        result = await replay(records, vdev_socket_dir / "impostor.sock")
    expected_at = first_id_reply(records)
    assert result.divergence == Divergence(
        index=expected_at.index,
        connection=0,
        message=expected_at.describe(),
        field="payload.data",
        expected="4f4c4548",
        got="494d4950",
    )
    assert str(result.divergence).startswith(f"message {expected_at.index} (REGION_READ reply #")

    # The same change, declared irrelevant, replays cleanly.
    async with served(Impostor(), vdev_socket_dir / "ignored.sock"):
        result = await replay(records, vdev_socket_dir / "ignored.sock", ignore=["REGION_READ:payload.data"])
    assert result.ok, result.divergence


async def edu_dma(client: Client, intx: Interrupt, source: int, destination: int, count: int, to_ram: bool) -> None:
    """One edu transfer, waiting for its completion interrupt and acknowledging it."""
    command = 0x1 | 0x4 | (0x2 if to_ram else 0)
    for offset, value in ((0x80, source), (0x88, destination), (0x90, count), (0x98, command)):
        await client.region_write(0, offset, value.to_bytes(8, "little"))
    with trio.fail_after(5):
        await intx.wait()
    await client.region_write(0, 0x64, (0x100).to_bytes(4, "little"))


@pytest.mark.requires("libvfio-user")
async def test_server_dma_is_answered_from_recreated_memory(vdev_socket_dir: Path) -> None:
    transcript = io.StringIO()
    pattern = bytes(range(7, 207))
    async with behind_proxy(vdev_socket_dir, Edu(dma_delay=0), transcript=transcript) as setup:
        async with Client.connect(setup.proxy_path) as client:
            await enable_memory(client)
            (intx,) = await client.set_irqs(IrqIndex.INTX, 0, 1)
            region = await client.dma_map_private(0x10_0000, 0x4000)  # DMA through messages
            region.write(0x100, pattern)
            await edu_dma(client, intx, 0x10_0100, 0x40000, len(pattern), to_ram=False)
            await edu_dma(client, intx, 0x40000, 0x10_2000, len(pattern), to_ram=True)
            assert region.read(0x2000, len(pattern)) == pattern
    records = read_transcript(transcript.getvalue().splitlines())
    server_requests = [r.type for r in records if r.direction is Direction.TO_CLIENT and r.is_request]
    assert server_requests == ["DmaReadRequest", "DmaWriteRequest"]
    recorded_write = next(r for r in records if r.type == "DmaWriteRequest")
    assert recorded_write.payload is not None and recorded_write.payload["data"] == pattern.hex()

    fresh = Edu(dma_delay=0)
    async with served(fresh, vdev_socket_dir / "fresh.sock"):
        result = await replay(records, vdev_socket_dir / "fresh.sock", pace=True)
    assert result.ok, result.divergence
    # The device read the recorded guest memory: the replayer served it.
    assert bytes(fresh.dma_buffer[: len(pattern)]) == pattern

    class Scrambling(Edu):
        """An edu whose DMA engine corrupts the first byte it writes to RAM."""

        async def _run_dma(self) -> None:
            if self.dma_cmd & 0x2:
                self.dma_buffer[0] ^= 0xFF
            await super()._run_dma()

    async with served(Scrambling(dma_delay=0), vdev_socket_dir / "scrambled.sock"):
        result = await replay(records, vdev_socket_dir / "scrambled.sock", pace=True)
    assert result.divergence is not None
    assert (result.divergence.index, result.divergence.field) == (recorded_write.index, "payload.data")


def test_comparison_rules() -> None:
    reply = RegionReadReply(msg_id=4, region=0, offset=0, data=b"OLEH")
    data = reply.encode()

    def record(
        message_data: bytes, *, direction: Direction = Direction.TO_CLIENT, fds: tuple[FdInfo, ...] = ()
    ) -> Record:
        header = Header.decode(message_data)
        return Record(
            index=3,
            connection=0,
            time=0.0,
            direction=direction,
            raw=message_data,
            fds=fds,
            header=header,
            type="RegionReadReply",
            payload={"region": 0, "offset": 0, "data": message_data[32:].hex()},
        )

    same = record(data)
    assert compare_records(same, record(data)) is None
    other = RegionReadReply(msg_id=4, region=0, offset=0, data=b"OLEX").encode()
    assert compare_records(same, record(other)) == ("payload.data", "4f4c4548", "4f4c4558")
    assert compare_records(same, record(other), ignore=["payload.*"]) is None
    assert compare_records(same, record(other), ignore=["REGION_WRITE:payload.data"]) is not None
    renumbered = RegionReadReply(msg_id=5, region=0, offset=0, data=b"OLEH").encode()
    assert compare_records(same, record(renumbered)) == ("header.msg_id", 4, 5)
    with_fd = record(data, fds=(FdInfo("memfd", 4096),))
    assert compare_records(with_fd, record(data, fds=(FdInfo("memfd", 1 << 20),))) is None  # sizes may differ
    assert compare_records(with_fd, record(data, fds=(FdInfo("eventfd"),))) == ("fds[0]", "memfd", "eventfd")
    assert compare_records(with_fd, record(data))[0] == "fds[0]"  # type: ignore[index]
    as_json = json.loads(same.to_json())
    assert Record.from_dict(as_json) == same


def test_a_long_difference_is_shown_from_its_first_differing_byte() -> None:
    """Issue 15: a differing 256-byte config read was shown as 512 hex digits a side, naming no offset."""
    expected = bytes(range(256))
    got = bytearray(expected)
    got[0x10:0x12] = b"\xff\xff"
    divergence = Divergence(7, 0, "REGION_READ reply #3", "payload.data", expected.hex(), bytes(got).hex())
    text = str(divergence)
    assert 'payload.data: byte 0x10 of 256: expected "101112131415161718191a1b1c1d1e1f…"' in text
    assert 'got "ffff12131415161718191a1b1c1d1e1f…"' in text
    assert len(text) < 200


@pytest.mark.requires("libvfio-user")
async def test_replay_against_a_server_that_served_before_says_why_it_diverges(vdev_socket_dir: Path) -> None:
    """Issue 15: the walkthrough replays against the server it recorded, which has kept the client's config."""
    path = vdev_socket_dir / "session.jsonl"
    with open(path, "w", encoding="utf-8") as transcript:  # noqa: ASYNC230 - a local file, once
        async with behind_proxy(vdev_socket_dir, transcript=transcript) as setup:
            async with Client.connect(setup.proxy_path) as client:
                await client.region_read(7, 0, 256)  # what QEMU does first
                await enable_memory(client)
                assert await client.read32(0, 0x0) == HELLO_ID_VALUE
            used = await replay(path, setup.server_path)
    assert used.divergence is not None and used.divergence.field == "payload.data"
    assert "byte 0x4 of 256" in str(used.divergence)  # COMMAND, which the recorded client set
    assert "replay against a freshly started one" in str(used.divergence)
    async with served(Hello(), vdev_socket_dir / "fresh.sock"):
        assert (await replay(path, vdev_socket_dir / "fresh.sock")).ok


# --- the command line --------------------------------------------------------------------------


@pytest.mark.requires("qemu", "libvfio-user")
async def test_vdev_replay_exit_status_and_report(vdev_socket_dir: Path) -> None:
    path = await record_qemu_session(vdev_socket_dir)
    records = load_transcript(path)
    for device, status in ((Hello(), 0), (Impostor(), 1)):
        socket = vdev_socket_dir / f"{type(device).__name__}.sock"
        async with served(device, socket):
            result = await trio.run_process(
                [*VDEV, "replay", str(path), "--socket-path", str(socket)],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
        output = result.stdout.decode()
        assert result.returncode == status, output + result.stderr.decode()
        if status == 0:
            assert re.fullmatch(
                r"replayed \d+ message\(s\), compared \d+ answer\(s\) over 1 connection\(s\): no divergence\n", output
            )
        else:
            index = first_id_reply(records).index
            assert output.startswith(f"divergence at message {index} (REGION_READ reply #")
            assert output.rstrip().endswith('payload.data: expected "4f4c4548", got "494d4950"')
    (vdev_socket_dir / "junk.jsonl").write_text("{not json\n")
    bad = await trio.run_process(
        [*VDEV, "replay", str(vdev_socket_dir / "junk.jsonl"), "--socket-path", "/nonexistent"],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert bad.returncode == 2 and "not JSON" in bad.stderr.decode() and len(bad.stderr.splitlines()) == 1


@pytest.mark.requires("libvfio-user")
async def test_vdev_proxy_records_and_logs_faults_from_a_toml_plan(vdev_socket_dir: Path) -> None:
    plan = vdev_socket_dir / "plan.toml"
    plan.write_text(
        '[[faults]]\nfault = "delay"\nseconds = 0.3\ndirection = "to_client"\n'
        'command = "REGION_READ"\nregion = "BAR0"\noffset = 0\n'
    )
    server, listen = vdev_socket_dir / "server.sock", vdev_socket_dir / "proxy.sock"
    transcript, fault_log = vdev_socket_dir / "session.jsonl", vdev_socket_dir / "faults.jsonl"
    async with served(Hello(), server), trio.open_nursery() as nursery:
        command = [*VDEV, "proxy", "--listen", str(listen), "--connect", str(server), "--wire-faults", str(plan)]
        command += ["--record", str(transcript), "--fault-log", str(fault_log)]
        process = await nursery.start(functools.partial(trio.run_process, command, check=False, capture_stderr=True))
        with trio.fail_after(20):
            while not listen.exists():
                await trio.sleep(0.05)
            async with Client.connect(listen) as client:
                await enable_memory(client)
                started = trio.current_time()
                assert int.from_bytes(await client.region_read(0, 0, 4), "little") == HELLO_ID_VALUE
                assert trio.current_time() - started >= 0.3
        process.send_signal(signal.SIGTERM)
    assert process.returncode == 0
    (line,) = fault_log.read_text().splitlines()
    assert json.loads(line)["fault"] == "delay"
    records = load_transcript(transcript)
    assert records[0].describe() == "VERSION request #0"
    assert [r.faults for r in records if r.faults] == [("delay",)]
    assert not listen.exists()


async def test_vdev_proxy_refuses_a_bad_plan_in_one_line(tmp_path: Path) -> None:
    plan = tmp_path / "plan.json"
    plan.write_text('{"faults": [{"fault": "delay", "seconds": 1, "regoin": 0}]}')
    command = [*VDEV, "proxy", "--listen", str(tmp_path / "a.sock"), "--connect", str(tmp_path / "b.sock")]
    result = await trio.run_process(
        [*command, "--wire-faults", str(plan)],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert result.returncode == 2
    (message,) = result.stderr.decode().splitlines()
    assert message.startswith("vdev: error: ") and "fault #0: unknown key(s) regoin" in message


# --- the documentation ---------------------------------------------------------------------------


@pytest.mark.requires("qemu", "libvfio-user")
async def test_the_documented_recording_and_regression_test_work(tmp_path: Path) -> None:
    text = DOC.read_text()
    (recorder,) = re.findall(r"```python\n(# record_hello\.py.*?)```", text, flags=re.DOTALL)
    (test_file,) = re.findall(r"```python\n(# test_hello_replay\.py\n.*?)```", text, flags=re.DOTALL)
    (tmp_path / "record_hello.py").write_text(recorder)
    (tmp_path / "test_hello_replay.py").write_text(test_file)
    env = {**os.environ, "PYTHONPATH": ""}
    recorded = await trio.run_process(
        [sys.executable, "record_hello.py", "transcripts/hello-qemu.jsonl"],
        cwd=tmp_path,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        env=env,
    )
    assert recorded.returncode == 0, recorded.stderr.decode()
    assert (tmp_path / "transcripts" / "hello-qemu.jsonl").stat().st_size > 0
    result = await trio.run_process(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_hello_replay.py"],
        cwd=tmp_path,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        env=env,
    )
    output = result.stdout.decode()
    assert result.returncode == 0, output + result.stderr.decode()
    assert "2 passed" in output
