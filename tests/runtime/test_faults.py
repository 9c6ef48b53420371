"""Device-level faults from a plan, applied without changing the device, seen by the client."""

from __future__ import annotations

import errno
import json
import struct
import sys
from pathlib import Path

import pytest
import trio

from vdev.client import VfioUserError
from vdev.model.events import FaultInjected, Irq, Reset
from vdev.model.faults import DeviceFault, DeviceFaultPlan, DeviceFaultPlanError, define_fault_event
from vdev.protocol.constants import IrqIndex
from vdev.testing import ConnectClient
from vdev_devices.edu import Edu
from vdev_devices.hello import Hello

pytestmark = pytest.mark.requires("libvfio-user")


def u32(data: bytes) -> int:
    return struct.unpack("<I", data)[0]


async def test_errno_fault_answers_the_access_with_it(vdev_client: ConnectClient) -> None:
    device = Hello()
    device.faults = DeviceFaultPlan(
        [DeviceFault(on="read", action="errno", region=0, offset=0x4, errno=errno.EACCES, count=1)]
    )
    client = await vdev_client(device)
    await client.enable(memory=True, io=False, master=False)
    with pytest.raises(VfioUserError) as failure:
        await client.region_read(0, 0x4, 4)
    assert failure.value.errno == errno.EACCES
    assert u32(await client.region_read(0, 0x4, 4)) == 0  # count=1: the second read is fine
    assert [e.fault.action for e in device.events.of_kind(FaultInjected)] == ["errno"]


async def test_corrupt_and_drop(vdev_client: ConnectClient) -> None:
    device = Hello()
    device.faults = DeviceFaultPlan(
        [
            DeviceFault(on="read", action="corrupt", region=0, offset=0x0, xor=0xFF),
            DeviceFault(on="write", action="drop", region=0, offset=0x4, after=1),
        ]
    )
    client = await vdev_client(device)
    await client.enable(memory=True, io=False, master=False)
    assert u32(await client.region_read(0, 0x0, 4)) == 0x48454C4F ^ 0xFF
    await client.region_write(0, 0x4, struct.pack("<I", 1))
    await client.region_write(0, 0x4, struct.pack("<I", 2))  # dropped
    assert device.bar0["scratch"] == 1


async def test_a_delayed_access_delays_only_its_device(vdev_client: ConnectClient) -> None:
    """The other device answers 20 reads while the slow one is inside its injected delay.

    The slow read is known to be waiting once its ``fault`` event is
    recorded.  Had the devices not been served independently, the fast reads
    would have waited for the slow one, which would then have finished first.
    """
    slow, fast = Hello(name="slow"), Hello(name="fast")
    slow.faults = DeviceFaultPlan([DeviceFault(on="read", action="delay", seconds=1.0, region=0, offset=0x0)])
    slow_client, fast_client = await vdev_client(slow), await vdev_client(fast)
    await slow_client.enable(memory=True, io=False, master=False)
    await fast_client.enable(memory=True, io=False, master=False)
    order = []

    async def slow_read() -> None:
        assert await slow_client.read32(0, 0x0) == 0x48454C4F
        order.append("slow")

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(slow_read)
            await slow.events.wait_for(FaultInjected)
            for _ in range(20):
                assert await fast_client.read32(0, 0x0) == 0x48454C4F
            order.append("fast")
    assert order == ["fast", "slow"]


@pytest.mark.parametrize(("action", "expected"), [("drop", 0), ("duplicate", 2), ("storm", 25)])
async def test_interrupt_faults(vdev_client: ConnectClient, action: str, expected: int) -> None:
    device = Hello()
    device.faults = DeviceFaultPlan([DeviceFault(on="irq", action=action, times=25)])
    client = await vdev_client(device)
    await client.enable(memory=True, io=False, master=False)
    (intx,) = await client.set_irqs(IrqIndex.INTX, 0, 1)
    await client.region_write(0, 0x0C, struct.pack("<I", 1))  # doorbell: one interrupt
    assert u32(await client.region_read(0, 0x0, 4))  # orders after the doorbell
    assert len(device.events.of_kind(Irq)) == expected
    assert intx.pending() == expected


async def test_err_and_req_faults_signal_the_client_and_the_access_goes_on(vdev_client: ConnectClient) -> None:
    device = Hello()
    device.faults = DeviceFaultPlan.from_mapping(
        {
            "faults": [
                {"on": "read", "region": 0, "offset": 0x0, "action": "err", "after": 1, "count": 1},
                {"on": "write", "region": 0, "offset": 0x4, "action": "req"},
            ]
        }
    )
    client = await vdev_client(device)
    await client.enable(memory=True, io=False, master=False)
    err, req = (await client.set_irqs(IrqIndex.ERR))[0], (await client.set_irqs(IrqIndex.REQ))[0]
    assert u32(await client.region_read(0, 0x0, 4)) == 0x48454C4F  # after=1: not this one
    assert err.pending() == 0
    assert u32(await client.region_read(0, 0x0, 4)) == 0x48454C4F
    assert (err.pending(), req.pending()) == (1, 0)
    await client.region_write(0, 0x4, struct.pack("<I", 9))
    assert device.bar0["scratch"] == 9
    assert (err.pending(), req.pending()) == (0, 1)
    assert [e.fault.action for e in device.events.of_kind(FaultInjected)] == ["err", "req"]
    with pytest.raises(DeviceFaultPlanError, match="does not apply"):
        DeviceFault(on="irq", action="err")


async def test_dma_fault_fails_the_transfer(vdev_client: ConnectClient) -> None:
    device = Edu(dma_delay=0)
    device.faults = DeviceFaultPlan([DeviceFault(on="dma", action="fail", count=1)])
    client = await vdev_client(device)
    await client.enable(memory=True, io=False, master=True)
    region = await client.dma_map_memfd(0x10_0000, 0x1000)
    region.write(0, b"payload")
    for _attempt in range(2):
        for offset, value in ((0x80, 0x10_0000), (0x88, 0x40000), (0x90, 7), (0x98, 1)):
            await client.region_write(0, offset, struct.pack("<Q", value))
        with trio.fail_after(5):
            while struct.unpack("<Q", await client.region_read(0, 0x98, 8))[0] & 1:
                await trio.sleep(0.005)
        if _attempt == 0:
            assert bytes(device.dma_buffer[:7]) == bytes(7)  # the injected failure
    assert bytes(device.dma_buffer[:7]) == b"payload"  # the second transfer went through
    assert [e.fault.on for e in device.events.of_kind(FaultInjected)] == ["dma"]


async def test_reset_fault_fails_device_reset(vdev_client: ConnectClient) -> None:
    device = Hello()
    device.faults = DeviceFaultPlan([DeviceFault(on="reset", action="fail", errno=errno.EIO)])
    client = await vdev_client(device)
    with pytest.raises(VfioUserError) as failure:
        await client.device_reset()
    assert failure.value.errno == errno.EIO
    assert not device.events.of_kind(Reset)


async def test_busy_quiesce_holds_the_dma_map(vdev_client: ConnectClient) -> None:
    device = Hello()
    device.faults = DeviceFaultPlan([DeviceFault(on="quiesce", action="busy", seconds=0.3)])
    client = await vdev_client(device)
    await client.dma_map_memfd(0x10_0000, 0x1000)
    kinds = [e.kind for e in device.events if e.kind in ("fault", "quiesce", "dma_map")]
    assert kinds == ["quiesce", "fault", "quiesce", "dma_map"]


def test_plan_files_and_their_errors(tmp_path: Path) -> None:
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(
        json.dumps(
            {"seed": 3, "faults": [{"on": "write", "region": 2, "offset": [0, 8], "action": "errno", "errno": "EIO"}]}
        )
    )
    plan = DeviceFaultPlan.load(plan_file)
    assert plan.seed == 3 and plan.faults[0].offset == (0, 8) and plan.faults[0].errno == errno.EIO
    toml_file = tmp_path / "plan.toml"
    toml_file.write_text('seed = 1\n[[faults]]\non = "irq"\naction = "storm"\ntimes = 10\n')
    assert DeviceFaultPlan.load(toml_file).faults[0].times == 10
    with pytest.raises(DeviceFaultPlanError, match="does not apply"):
        DeviceFaultPlan.from_mapping({"faults": [{"on": "irq", "action": "delay"}]})
    with pytest.raises(DeviceFaultPlanError, match="unknown errno"):
        DeviceFaultPlan.from_mapping({"faults": [{"on": "read", "action": "errno", "errno": "ENOPE"}]})


def test_probability_is_reproducible_with_a_seed() -> None:
    def injected(seed: int) -> list[bool]:
        plan = DeviceFaultPlan([DeviceFault(on="read", action="errno", probability=0.3)], seed=seed)
        return [plan.pick("read", region=0, offset=0) is not None for _ in range(200)]

    assert injected(11) == injected(11) and injected(11) != injected(12)
    assert 30 < sum(injected(11)) < 90


async def test_serve_loads_a_plan_and_rejects_a_bad_one(vdev_socket_dir: Path) -> None:
    bad = vdev_socket_dir / "bad.json"
    bad.write_text('{"faults": [{"on": "teleport", "action": "now"}]}')
    result = await trio.run_process(
        [
            sys.executable,
            "-m",
            "vdev",
            "serve",
            "hello",
            "--socket-path",
            str(vdev_socket_dir / "h.sock"),
            "--device-faults",
            str(bad),
        ],
        capture_stderr=True,
        check=False,
    )
    assert result.returncode == 2 and "unknown fault event 'teleport'" in result.stderr.decode()


def test_a_device_defines_its_own_fault_events() -> None:
    """A device's event takes its own actions, matches on ``where`` and checks its ``params`` when a plan is read."""

    def check(fault: DeviceFault) -> None:
        if set(fault.params) - {"level"}:
            raise DeviceFaultPlanError("only 'level'")

    define_fault_event("test-widget", {"jam", "delay"}, check)
    define_fault_event("test-widget", {"jam", "delay"}, check)  # the same definition again is fine
    with pytest.raises(ValueError, match="already defined differently"):
        define_fault_event("test-widget", {"jam"}, check)
    with pytest.raises(ValueError, match="the framework's own"):
        define_fault_event("read", {"jam"})

    plan = DeviceFaultPlan.from_mapping(
        {"faults": [{"on": "test-widget", "action": "jam", "where": {"slot": [1, 2]}, "params": {"level": 3}}]}
    )
    assert plan.pick("test-widget", slot=3) is None
    fault = plan.pick("test-widget", slot=2)
    assert fault is not None and fault.describe()["params"] == {"level": 3}
    # a device's delay is carried out by the device in its own tasks: no need to serve it threaded
    assert not DeviceFaultPlan([DeviceFault(on="test-widget", action="delay", seconds=1)]).needs_thread

    with pytest.raises(DeviceFaultPlanError, match="only 'level'"):
        DeviceFaultPlan.from_mapping({"faults": [{"on": "test-widget", "action": "jam", "params": {"colour": 1}}]})
    with pytest.raises(DeviceFaultPlanError, match="action 'drop' does not apply to 'test-widget'"):
        DeviceFaultPlan.from_mapping({"faults": [{"on": "test-widget", "action": "drop"}]})
    with pytest.raises(DeviceFaultPlanError, match="'read' faults take no 'where' or 'params'"):
        DeviceFaultPlan.from_mapping({"faults": [{"on": "read", "action": "delay", "where": {"slot": 1}}]})
