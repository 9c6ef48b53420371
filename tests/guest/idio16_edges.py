"""Edge events from vdev's ``idio16`` through Linux's ``gpio-pci-idio-16``, and the kernel bug they expose.

One run: a guest boots with the card, ``gpio-lines`` requests edge events on
some of the card's input lines (chip lines 16-31), the card raises input 4
(chip line 20) and interrupts, and the run ends in one of two known ways:

* :attr:`Outcome.EDGE`: user space reads a rising edge on line 20;
* :attr:`Outcome.NULL_CALL`: the kernel calls a NULL function from the
  card's interrupt thread — ``handle_nested_irq`` called by
  ``regmap_irq_thread`` with ``RIP: 0x0`` (docs/findings.md, finding 1).
  The regmap-based driver gives all 16 input IRQs the same status bit, so
  regmap-irq handles all 16 whenever one is requested, and calls
  ``handle_nested_irq(0)`` for the ones nobody mapped.

Anything else (a timeout, any other kernel report, a crash with a
different call trace) raises.  The guest test and the reproduction
(``tools/findings/idio16.py``, which writes ``docs/evidence/idio16-regmap-irq/``)
share this module, so both classify a run the same way; the test takes the
outcome each kernel package is expected to show from that evidence.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from vdev.model.events import RegionRead, RegionWrite
from vdev.qemu.guest import GuestArtefacts, GuestKernelError, GuestMachine
from vdev.testing import served, vfio_user_pci
from vdev_devices.idio16 import Idio16

#: Where the card sits in the guest (``addr=0x4`` on the q35 root bus).
ADDR = "0000:00:04.0"
#: The card input the run changes, and its GPIO chip line (inputs are chip lines 16-31).
CHANGED_INPUT = 4
CHANGED_LINE = 16 + CHANGED_INPUT
#: Every input line, the changed one first (``gpio-lines`` waits for the first ``-e`` line's event).
ALL_INPUT_LINES = [CHANGED_LINE, *(line for line in range(16, 32) if line != CHANGED_LINE)]
#: What each kernel package showed over recorded runs (written by tools/findings/idio16.py).
EVIDENCE = Path(__file__).resolve().parents[2] / "docs" / "evidence" / "idio16-regmap-irq" / "outcomes.json"

#: Prints IRQ 0's count from /proc/interrupts: handle_nested_irq(0) counts an interrupt there before calling.
IRQ0_SCRIPT = """#!/bin/sh
set -- $(grep -E '^ *0:' /proc/interrupts)
echo "VDEV {\\"kind\\":\\"irq0\\",\\"count\\":$2,\\"name\\":\\"$*\\"}"
"""

#: The only kernel problem lines the NULL call produces (the panic line only with ``oops=panic``).
_NULL_CALL_LINES = (
    re.compile(r"BUG: kernel NULL pointer dereference, address: 0+\s*$"),
    re.compile(r"\bOops: (?:Oops: )?0010 \[#1\]"),
    re.compile(r"\bKernel panic - not syncing: Fatal exception"),
)


class Outcome(StrEnum):
    """How an edge run ended."""

    EDGE = "edge"
    NULL_CALL = "regmap-irq-null-call"


@dataclass
class EdgeRun:
    """What one run showed."""

    outcome: Outcome
    #: ``gpio.edge`` results, in arrival order.
    edges: list[dict[str, Any]]
    #: The kernel's report around the NULL call (empty for an edge).
    report: list[str]
    #: The card's BAR2 accesses from the input change on: (kind, offset, value).
    bar2: list[tuple[str, int, int]]
    #: IRQ 0's count before the edge request and after the run (``None``: the guest did not get there).
    irq0: tuple[int | None, int | None]
    #: Kernel problems after the first report (a guest that lives on after the oops may hit more).
    later_problems: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "outcome": self.outcome.value,
            "edges": self.edges,
            "bar2": [list(access) for access in self.bar2],
            "irq0": list(self.irq0),
            "later_problems": self.later_problems,
        }


def is_regmap_irq_null_call(error: GuestKernelError) -> bool:
    """Whether ``error``'s first report is exactly the known bug, and nothing else went wrong before its end.

    The first problem is a NULL dereference at address 0 by an instruction
    fetch (a call through a NULL function pointer: ``RIP: 0x0``), in the
    card's interrupt thread, with ``handle_nested_irq`` called by
    ``regmap_irq_thread`` at the top of the call trace; every problem line
    of the report belongs to that oops.  (With ``oops=panic`` the run ends
    with this report; a guest left running may oops again as the dead
    interrupt thread exits — :attr:`EdgeRun.later_problems`.)
    """
    problems = [line for line in error.problems if line in error.report]
    return (
        bool(problems)
        and _NULL_CALL_LINES[0].search(problems[0]) is not None
        and all(any(pattern.search(line) for pattern in _NULL_CALL_LINES) for line in problems)
        and error.rip == "0x0"
        and error.call_trace[:2] == ["handle_nested_irq", "regmap_irq_thread"]
        and any("Comm: irq/" in line for line in error.report)
    )


def single_kernel_error(exc: BaseException) -> GuestKernelError | None:
    """The :class:`GuestKernelError` ``exc`` is or holds alone (task groups wrap it), else ``None``."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc if isinstance(exc, GuestKernelError) else None


def recorded_outcome(artefacts: GuestArtefacts, evidence: Path = EVIDENCE) -> Outcome | None:
    """The one-line outcome every recorded run of this kernel package showed; ``None`` if not recorded or mixed."""
    kernels = json.loads(evidence.read_text())["kernels"]
    entry = kernels.get(f"{artefacts.package}={artefacts.package_version}")
    if entry is None:
        return None
    seen = [name for name, count in entry["one_line"].items() if count]
    if len(seen) != 1 or seen[0] not in set(Outcome) or entry["one_line"][seen[0]] != entry["repeats"]:
        return None
    return Outcome(seen[0])


async def edge_run(
    qemu_binary: Path,
    artefacts: GuestArtefacts,
    socket: Path,
    lines: list[int],
    *,
    panic_on_problem: bool = True,
    workdir: Path | None = None,
) -> EdgeRun:
    """Boot, request edges on ``lines`` (the first must be :data:`CHANGED_LINE`), raise the input, classify.

    With ``panic_on_problem`` (the harness default) the NULL call ends the
    run at once; without it the guest lives on (the interrupt thread dies),
    ``gpio-lines`` times out and IRQ 0's count is read again afterwards.
    Raises whatever the run showed that is neither known outcome.
    """
    if lines[0] != CHANGED_LINE:
        raise ValueError(f"the first line must be {CHANGED_LINE}, the one that changes")
    device = Idio16()
    edges = " ".join(f"-e {line}" for line in lines)
    machine = GuestMachine(
        binary=qemu_binary,
        kernel=artefacts.kernel,
        initrd=artefacts.initrd,
        devices=[vfio_user_pci(socket, addr="0x4")],
        run=["/opt/irq0", f"gpio-lines {edges} -t 5000 {ADDR}", "/opt/irq0"],
        files={"/opt/irq0": IRQ0_SCRIPT},
        timeout=120,
        workdir=workdir,
        panic_on_problem=panic_on_problem,
        check_kernel=panic_on_problem,
        # The report's end marker ends the run; the grace only caps the wait on a slow, loaded host.
        problem_grace=60,
    )
    edge_events: list[dict[str, Any]] = []
    irq0_before: int | None = None
    irq0_after: int | None = None
    try:
        async with served(device, socket), machine as vm:
            irq0_before = (await vm.expect("irq0"))["count"]
            waiting = await vm.expect("gpio.waiting")
            if waiting["lines"] != lines:
                raise AssertionError(f"gpio-lines waits on {waiting['lines']}, not {lines}")
            # Requesting the edge enabled the card's interrupt (it reads irq_ctl) before gpio-lines said so.
            if not device.irq_enabled:
                raise AssertionError("the edge request did not enable the card's interrupt")
            device.events.clear()
            device.set_inputs(1 << CHANGED_INPUT)
            async for result in vm:
                if result.kind == "gpio.edge":
                    edge_events.append(dict(result.data))
                elif result.kind == "irq0":
                    irq0_after = result["count"]
                elif result.kind == "init.done":
                    break
            await vm.wait_exit()
            error = vm.kernel_error()
    except BaseException as exc:  # only the known kernel report is an outcome; anything else is re-raised
        error = single_kernel_error(exc)
        if error is None:
            raise
    bar2 = [(e.kind, e.offset, e.value) for e in device.events.of_kind(RegionRead, RegionWrite) if e.region == 2]
    if error is not None:
        if not is_regmap_irq_null_call(error):
            raise error
        later = [line for line in error.problems if line not in error.report]
        return EdgeRun(Outcome.NULL_CALL, edge_events, error.report, bar2, (irq0_before, irq0_after), later)
    if not any(edge["line"] == CHANGED_LINE for edge in edge_events):
        raise AssertionError(f"no edge event on line {CHANGED_LINE} and no kernel report: {edge_events}")
    return EdgeRun(Outcome.EDGE, edge_events, [], bar2, (irq0_before, irq0_after))
