"""Reproduce findings 2 and 3 of docs/findings.md: QEMU's vfio-user-pci with a reply cut short.

Usage (from the repository root, after ``make deps``)::

    make finding-qemu REPEAT=20
    python -m tools.findings.qemu_partial_reply --repeat 20 --gdb --out results/findings/qemu-partial-reply

QEMU (qtest) reads ``Hello``'s id register through vdev's proxy, which
cuts the server's 36-byte reply (tests/proxy/qemu_reads.py drives and
classifies each session).  Variants, each run ``--repeat`` times:

``truncated``
    18 bytes sent, the size field still saying 36, the connection kept
    open: QEMU holds a partial reply when the request times out (500 ms);
``close``
    18 bytes sent, then the proxy hangs up, QEMU running freely: whether
    QEMU reads the hangup together with the partial reply or after it is a
    race, so this variant gives a rate;
``close_held``
    the same with QEMU stopped (SIGSTOP) from the moment the server reads
    the register until the proxy has hung up: QEMU finds both at once;
``short``
    34 bytes with the size field saying 34 (finding 3): the read's value.

Outcomes: ``sigsegv`` (QEMU died), ``timeout`` (the read waited out
``x-msg-timeout``), ``error`` (it failed at once), ``value`` (it returned
data).  ``--gdb`` runs one ``truncated`` session with QEMU under gdb and
writes ``crash-site.txt``: the faulting instruction's address in the QEMU
binary, registers, the disassembly around it and the strings it refers to
(the error call right after the fault names its function, file and line).

Written to ``--out``: ``outcomes.json`` (counts per variant, provenance)
and ``runs.json`` (each session: value, seconds, QEMU's last stderr lines).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio

from tests.proxy.qemu_reads import QemuRun, on_id_reply, read_id_through
from tests.proxy.support import behind_proxy
from vdev import deps
from vdev.provenance import collect
from vdev.proxy import Close, Fault, Truncate

#: Variant name -> (the fault on the reply, hold QEMU stopped until the hangup).
VARIANTS: dict[str, tuple[Fault, bool]] = {
    "truncated": (Truncate(resize=False), False),
    "close": (Close(), False),
    "close_held": (Close(), True),
    "short": (Truncate(keep=34), False),
}


async def session(variant: str, binary: Path | None = None) -> QemuRun:
    fault, held = VARIANTS[variant]
    wait_for = ("server closed socket",) if isinstance(fault, Close) else ()
    with tempfile.TemporaryDirectory(prefix="vdev-qemu-finding-") as tmp:
        async with behind_proxy(Path(tmp), plan=on_id_reply(fault)) as setup:
            return await read_id_through(setup, wait_for=wait_for, hold_until_hangup=held, binary=binary)


# -- the crash site, from gdb and the binary ----------------------------------------


def _gdb_wrapper(directory: Path, log: Path) -> Path:
    """A script that runs the provisioned QEMU under gdb and logs registers and mappings at the fault."""
    qemu = deps.qemu_path()
    shell = ["/bin/sh"] if qemu.read_bytes()[:2] == b"#!" else []
    commands = [
        f"set logging file {log}",
        "set logging redirect on",
        "set logging enabled on",
        "set pagination off",
        "handle SIGPIPE nostop noprint pass",
        "handle SIGUSR1 nostop noprint pass",
        "run",
        "info registers rip rax rdx",
        "info proc mappings",
        "kill",
    ]
    args = " ".join(f"-ex '{command}'" for command in commands)
    wrapper = directory / "qemu-under-gdb"
    wrapper.write_text(f'#!/bin/sh\nexec gdb -batch -nx -q {args} --args {" ".join(shell)} {qemu} "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


def _strings(binary: Path, addresses: Sequence[int]) -> dict[int, str]:
    """The NUL-terminated strings at ``addresses`` (virtual addresses in ``binary``'s loadable segments)."""
    data = binary.read_bytes()
    phoff = struct.unpack_from("<Q", data, 0x20)[0]
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    segments = []
    for index in range(phnum):
        kind, _, offset, vaddr, _, filesz = struct.unpack_from("<IIQQQQ", data, phoff + index * phentsize)
        if kind == 1:  # PT_LOAD
            segments.append((vaddr, offset, filesz))
    found = {}
    for address in addresses:
        for vaddr, offset, filesz in segments:
            if vaddr <= address < vaddr + filesz:
                start = offset + address - vaddr
                found[address] = data[start : data.index(b"\0", start)].decode(errors="replace")
    return found


def crash_site(log: Path) -> str:
    """The faulting instruction in the QEMU binary, with the disassembly and strings around it."""
    text = log.read_text(errors="replace")
    rip = re.search(r"^rip\s+(0x[0-9a-f]+)", text, re.M)
    mapping = re.search(r"^\s+(0x[0-9a-f]+)\s+0x[0-9a-f]+\s+0x[0-9a-f]+\s+0x0\s+\S+\s+(\S*qemu-system\S*)$", text, re.M)
    if "SIGSEGV" not in text or rip is None or mapping is None:
        return f"no SIGSEGV with a mapped QEMU binary in the gdb log:\n{text[-2000:]}"
    binary = Path(mapping[2])
    address = int(rip[1], 16) - int(mapping[1], 16)
    lines = [f"SIGSEGV in {binary} at {address:#x} (rip {rip[1]}, binary mapped at {mapping[1]})"]
    lines += [line for line in text.splitlines() if re.match(r"^r(ip|ax|dx)\s", line)]
    if shutil.which("objdump") is None:
        return "\n".join([*lines, "(objdump not found: no disassembly)"])
    listing = subprocess.run(
        [
            "objdump",
            "-d",
            "--no-show-raw-insn",
            f"--start-address={address - 0x40:#x}",
            f"--stop-address={address + 0x12:#x}",
            binary,
        ],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    window = [line for line in listing.splitlines() if re.match(r"^\s+[0-9a-f]+:", line)]
    lines += ["", "disassembly (=> the faulting instruction):"]
    lines += [("=> " if line.strip().startswith(f"{address:x}:") else "   ") + line.strip() for line in window]
    # error_setg*() passes __LINE__ in edx: the first such immediate after the fault is the call's source line.
    after = "\n".join(line for line in window if int(line.split(":")[0], 16) > address)
    line_number = re.search(r"mov\s+\$0x([0-9a-f]+),%edx", after)
    if line_number is not None:
        lines.append(f"   (edx = {int(line_number[1], 16)} before the next call: the source line of the error call)")
    references = sorted({int(found, 16) for found in re.findall(r"# ([0-9a-f]+)", "\n".join(window))})
    lines += ["", "strings referred to:"]
    lines += [f"   {where:#x}: {value!r}" for where, value in _strings(binary, references).items()]
    return "\n".join(lines)


# -- the runs -----------------------------------------------------------------------


async def run_all(repeats: int, gdb_wrapper: Path | None) -> list[dict[str, Any]]:
    """Every variant ``repeats`` times, then (with ``gdb_wrapper``) one truncated session under gdb."""
    runs: list[dict[str, Any]] = []
    for repeat in range(1, repeats + 1):
        for variant in VARIANTS:
            run = await session(variant)
            runs.append({"variant": variant, "repeat": repeat} | run.to_json())
            print(f"{variant} {repeat}/{repeats}: {run.outcome} value {run.value} seconds {run.seconds}", flush=True)
    if gdb_wrapper is not None:
        await session("truncated", binary=gdb_wrapper)
    return runs


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.findings.qemu_partial_reply", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--repeat", type=int, default=20, help="sessions per variant")
    parser.add_argument("--gdb", action="store_true", help="also locate the crash in the QEMU binary with gdb")
    parser.add_argument("--out", type=Path, default=Path("results/findings/qemu-partial-reply"))
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if args.gdb and shutil.which("gdb") is None:
        parser.error("--gdb needs gdb")
    args.out.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    provenance = collect().to_json()  # before the runs: the code and components they use
    with tempfile.TemporaryDirectory(prefix="vdev-qemu-gdb-") as tmp:
        log = Path(tmp) / "gdb.log"
        wrapper = _gdb_wrapper(Path(tmp), log) if args.gdb else None
        runs = trio.run(run_all, args.repeat, wrapper)
        site = crash_site(log) if args.gdb else None
    counts: dict[str, dict[str, int]] = {variant: {} for variant in VARIANTS}
    for run in runs:
        counts[run["variant"]][run["outcome"]] = counts[run["variant"]].get(run["outcome"], 0) + 1
    outcomes = {
        "repeats": args.repeat,
        "variants": counts,
        "provenance": provenance,
        # The close variant is a race between QEMU's reads and the proxy's hangup: how busy the host was.
        "load_average_1_5_15": {"before": load_before, "after": os.getloadavg(), "cpus": os.cpu_count()},
    }
    (args.out / "outcomes.json").write_text(json.dumps(outcomes, indent=1, sort_keys=True) + "\n")
    (args.out / "runs.json").write_text(json.dumps(runs, indent=1) + "\n")
    print(json.dumps(counts, indent=1))
    if site is not None:
        (args.out / "crash-site.txt").write_text(site + "\n")
        print(site)
    return 0


if __name__ == "__main__":
    sys.exit(main())
