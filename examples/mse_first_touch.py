"""Memory-enable experiment on ``membar``: what a client's first touch costs after MEM comes back.

For each prefault policy (``lazy``, ``populate``) a client maps BAR0, writes
to every fourth page, clears COMMAND.MEM (the server revokes the memfd:
the client's page tables are emptied, as vfio-pci's zap does), sets it
again, and times its first read of every page.  With ``lazy`` the pages
that never held data are allocated and zeroed on that first touch; with
``populate`` every page is resident before the enabling write is answered.

    .venv/bin/python examples/mse_first_touch.py [--rounds N] [--plot PATH]

Prints a table and writes a plot (default results/mse_first_touch.png).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import trio

from vdev.client import Client
from vdev.testing import first_touch_ns, served
from vdev_devices.membar import MemBar

BAR0_SIZE = 16 << 20
PAGE = 4096
MEM = 0x2


async def one_round(prefault: str) -> tuple[list[int], list[int]]:
    """First-touch ns for (pages that held data, pages that did not)."""
    with tempfile.TemporaryDirectory(prefix="vdev-") as directory:
        socket = Path(directory) / "membar.sock"
        device = MemBar(size=str(BAR0_SIZE), mapping="revoke", prefault=prefault)
        async with served(device, socket), Client.connect(socket) as client:
            await client.region_write(7, 0x04, MEM.to_bytes(2, "little"))
            bar0 = await client.map_region(0)
            for page in range(0, BAR0_SIZE // PAGE, 4):
                bar0.write(page * PAGE, b"\x01")
            await client.region_write(7, 0x04, (0).to_bytes(2, "little"))
            await client.region_write(7, 0x04, MEM.to_bytes(2, "little"))
            ((_, mapping),) = bar0.areas
            costs = first_touch_ns(mapping)
    return [c for p, c in enumerate(costs) if p % 4 == 0], [c for p, c in enumerate(costs) if p % 4]


def percentile(values: list[int], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--plot", type=Path, default=Path("results/mse_first_touch.png"))
    args = parser.parse_args()
    samples: dict[tuple[str, str], list[int]] = {}
    for prefault in ("lazy", "populate"):
        for round_number in range(args.rounds):
            print(f"  … {prefault}: round {round_number + 1}/{args.rounds}", flush=True)
            with_data, holes = trio.run(one_round, prefault)
            samples.setdefault((prefault, "held data"), []).extend(with_data)
            samples.setdefault((prefault, "never written"), []).extend(holes)
    print(f"\nfirst touch after MEM off/on, {BAR0_SIZE >> 20} MiB BAR0, {args.rounds} rounds (ns per page)")
    print(f"{'prefault':9} {'pages':14} {'median':>8} {'p90':>8} {'p99':>8}")
    for (prefault, kind), values in samples.items():
        print(
            f"{prefault:9} {kind:14} {statistics.median(values):8.0f} {percentile(values, 0.9):8.0f}"
            f" {percentile(values, 0.99):8.0f}"
        )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 4.5))
    for (prefault, kind), values in samples.items():
        ordered = sorted(values)
        axis.plot(ordered, [i / len(ordered) for i in range(len(ordered))], label=f"{prefault}, {kind}")
    axis.set_xscale("log")
    axis.set_xlabel("first-touch time per page (ns, log scale)")
    axis.set_ylabel("fraction of pages")
    axis.set_title("membar BAR0: a client's first touch after memory enable")
    axis.legend()
    axis.grid(True, which="both", alpha=0.3)
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(args.plot, dpi=110)
    print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
