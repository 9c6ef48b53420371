"""Linux's own ``gpio-pci-idio-16`` driver runs vdev's ``idio16`` card, driven from user space.

The guest's /init loads the driver (it is in the initramfs), which binds
the card by its PCI IDs at boot; ``gpio-lines`` (guest/gpio-lines.c) then
sets output lines and reads input lines through the GPIO character device
(uAPI v2), as an application would.  The server sees the register writes
as ``gpio`` events, and the guest reads the inputs the test drove before
boot.

What the driver does at probe, seen by the server (BAR2 accesses before
``init.ready``; the COMMAND writes around them are the PCI core sizing
BARs, then IO enabled):

* 6.1 (its own driver): writes ``filter_ctl`` = 0 (filters off),
  ``irq_ctl`` = 0 (interrupt off), ``in0_7`` = 0 (clear a pending one);
* 6.12 and 7.x (the regmap-based ``gpio-idio-16`` library): ``irq_ctl`` = 0
  twice — first the library's own write ("disable IRQ to prevent spurious
  interrupts"), then regmap-irq's initial masking through the library's
  ``handle_mask_sync`` — then ``filter_ctl`` = 0 (read in
  ``devm_idio_16_regmap_register`` of 6.12.117, 7.2.13 and 7.3.4).

No kernel reads the card at probe.  Later differences: 6.1 reads the output
latch back from the card before each write; 6.12 and 7.x write from
regmap's cache; reading an output line back works on 6.1 (from the card) and
6.12 (from the cache), while 7.2 and 7.3 answer EIO (the library's regmap
makes only 0x1-0x2 and 0x5-0x6 readable).

The interrupt path has two tests: an edge requested on one input line,
which on some kernels hits a kernel bug (docs/findings.md, finding 1), and
edges on all 16 input lines, which avoids the bug and must deliver the
change on every kernel.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.guest.idio16_edges import (
    ADDR,
    ALL_INPUT_LINES,
    CHANGED_LINE,
    Outcome,
    edge_run,
    recorded_outcome,
)
from vdev.model.events import RegionRead, RegionWrite
from vdev.qemu.guest import GuestArtefacts, GuestMachine
from vdev.testing import served, vfio_user_pci
from vdev_devices.idio16 import Gpio, Idio16

INPUTS = 0xA5C3
OUTPUTS_SET = {0: 1, 3: 1, 9: 1, 15: 1, 4: 0}
INPUT_LINES = [16, 17, 18, 22, 31]  # chip lines 16-31 are the card's inputs 0-15
FILTER_CTL, IRQ_CTL, IN0_7 = 0x3, 0x2, 0x1

pytestmark = pytest.mark.requires("libvfio-user")


def version(release: str) -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", release)
    assert match is not None, release
    return int(match[1]), int(match[2])


def guest(qemu_binary: Path, artefacts: GuestArtefacts, socket: Path, run: list[str]) -> GuestMachine:
    return GuestMachine(
        binary=qemu_binary,
        kernel=artefacts.kernel,
        initrd=artefacts.initrd,
        devices=[vfio_user_pci(socket, addr="0x4")],
        run=run,
    )


async def test_the_driver_sets_outputs_and_reads_inputs_through_the_gpio_uapi(
    qemu_binary: Path, guest_artefacts: GuestArtefacts, vdev_socket_dir: Path
) -> None:
    device = Idio16()
    device.set_inputs(INPUTS)
    socket = vdev_socket_dir / "idio16.sock"
    outputs = " ".join(f"-o {line}={value}" for line, value in OUTPUTS_SET.items())
    inputs = " ".join(f"-i {line}" for line in INPUT_LINES)
    commands = ["pci-list", f"gpio-lines {outputs} {inputs} {ADDR}"]
    async with served(device, socket), guest(qemu_binary, guest_artefacts, socket, commands) as vm:
        ready = await vm.expect("init.ready")
        assert "gpio_pci_idio_16" in ready["modules"]
        probe = [(e.kind, e.offset, e.value) for e in device.events.of_kind(RegionRead, RegionWrite) if e.region == 2]
        device.events.clear()

        bound = await vm.expect("pci.device", addr=ADDR)
        assert (bound["vendor"], bound["device"], bound["driver"]) == ("494f", "0dc8", "pci-idio-16")
        chip = await vm.expect("gpio.chip")
        assert (chip["lines"], chip["label"]) == (32, ADDR)
        written = await vm.expect("gpio.set")
        assert dict(zip(written["lines"], written["values"])) == OUTPUTS_SET
        if version(guest_artefacts.release) < (7, 2):
            readback = await vm.expect("gpio.outputs")
            assert dict(zip(readback["lines"], readback["values"])) == OUTPUTS_SET
        else:
            refused = await vm.expect("gpio.error")
            assert (refused["op"], refused["errno"]) == ("GPIO_V2_LINE_GET_VALUES_IOCTL outputs", 5)
        read = await vm.expect("gpio.inputs")
        assert read["lines"] == INPUT_LINES
        assert read["values"] == [INPUTS >> (line - 16) & 1 for line in INPUT_LINES]
        await vm.expect("gpio.done")
        await vm.wait_exit()

    print(f"{guest_artefacts.release}: BAR2 accesses at probe {probe}")
    assert all(kind == "region_write" for kind, _, _ in probe), probe
    assert {(FILTER_CTL, 0), (IRQ_CTL, 0)} <= {(offset, value) for _, offset, value in probe}
    if version(guest_artefacts.release) < (6, 12):
        assert (IN0_7, 0) in {(offset, value) for _, offset, value in probe}

    expected = sum(1 << line for line, value in OUTPUTS_SET.items() if value)
    assert device.outputs == expected
    changes = [(e.line, e.value) for e in device.events.of_kind(Gpio) if e.direction == "out"]
    assert sorted(changes) == [(line, 1) for line in sorted(line for line, v in OUTPUTS_SET.items() if v)]
    assert not vm.kernel_problems


async def test_an_edge_on_one_input_line_is_delivered_or_hits_the_recorded_kernel_bug(
    qemu_binary: Path, guest_artefacts: GuestArtefacts, vdev_socket_dir: Path
) -> None:
    """The interrupt path as an application uses it: edges requested on one input line, then that input rises.

    Two outcomes are known (tests/guest/idio16_edges.py): the rising edge
    reaches user space (6.1.176), or the card's interrupt thread calls a
    NULL function — ``handle_nested_irq`` from ``regmap_irq_thread``,
    ``RIP: 0x0`` — and nothing else goes wrong (6.12.117, 7.2.13, 7.3.4).
    Which one a kernel package shows is taken from the runs recorded in
    docs/evidence/idio16-regmap-irq/outcomes.json, not from its version
    number: a recorded package must show its recorded outcome.  A package
    not recorded may show either, and the test prints which; any other end
    (a timeout, another kernel report, a crash elsewhere) fails everywhere.
    """
    expected = recorded_outcome(guest_artefacts)
    run = await edge_run(qemu_binary, guest_artefacts, vdev_socket_dir / "idio16.sock", [CHANGED_LINE])
    kernel = f"{guest_artefacts.package}={guest_artefacts.package_version}"
    print(f"{kernel}: {run.outcome} (recorded: {expected or 'not recorded, either outcome accepted'})")
    if run.outcome is Outcome.EDGE:
        assert [(edge["line"], edge["rising"]) for edge in run.edges] == [(CHANGED_LINE, True)]
    else:
        print("\n".join(run.report))
    if expected is not None:
        assert run.outcome is expected


async def test_edges_on_all_sixteen_input_lines_deliver_the_change_on_every_kernel(
    qemu_binary: Path, guest_artefacts: GuestArtefacts, vdev_socket_dir: Path
) -> None:
    """The control: with every input line's IRQ mapped, the same interrupt is delivered and nothing crashes.

    The card has one "some input changed" bit, so the driver cannot tell
    which line changed: every line with edge detection gets an event, the
    changed one rising and the others at their level (low, so falling).
    """
    run = await edge_run(qemu_binary, guest_artefacts, vdev_socket_dir / "idio16.sock", ALL_INPUT_LINES)
    print(f"{guest_artefacts.package}={guest_artefacts.package_version}: {run.outcome}, edges {run.edges}")
    assert run.outcome is Outcome.EDGE
    changed = [edge["rising"] for edge in run.edges if edge["line"] == CHANGED_LINE]
    assert changed == [True]
    assert not any(edge["rising"] for edge in run.edges if edge["line"] != CHANGED_LINE)
