"""The kernel's own vfio selftests in a 7.x guest against ``membar`` and ``ioat`` (``make kselftest`` in CI size).

CI runs ``vfio_pci_device_test`` on ``membar`` and ``vfio_pci_driver_test`` on
``ioat`` in one guest; ``make kselftest`` adds the two DMA-mapping programs,
which take as long again (the 1 GiB BAR's mmio variants most).

The parsing of what the selftest programs print is tested first, on text
shaped like theirs, so that a result the report could never see would be
noticed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import pytest

from vdev.qemu.guest import GuestArtefacts
from vdev_experiments.kselftest import (
    NO_IOMMUFD,
    ProgramRun,
    Selftests,
    parse_listing,
    parse_tap,
    run_kselftests,
    summary,
    write_report,
)

LISTING = """\
# FIXTURE            VARIANT                   TEST
vfio_dma_mapping_mmio_test vfio_type1_iommu          map_full_bar
                     iommufd                   map_partial_bar
--------------------------------------------------------------------------------
vfio_pci_device_test                           config_space_read_write
                                               reset
"""

TAP = """\
TAP version 13
1..4
#  RUN           vfio_dma_mapping_mmio_test.vfio_type1_iommu.map_full_bar ...
#            OK  vfio_dma_mapping_mmio_test.vfio_type1_iommu.map_full_bar
ok 1 vfio_dma_mapping_mmio_test.vfio_type1_iommu.map_full_bar
#  RUN           vfio_dma_mapping_mmio_test.vfio_type1_iommu.map_partial_bar ...
/src/vfio_pci_device.c:297: Assertion Failure
  open(/dev/vfio/2) failed
# map_partial_bar: Test failed
#          FAIL  vfio_dma_mapping_mmio_test.vfio_type1_iommu.map_partial_bar
not ok 2 vfio_dma_mapping_mmio_test.vfio_type1_iommu.map_partial_bar
#  RUN           vfio_pci_device_test.config_space_read_write ...
ok 3 vfio_pci_device_test.config_space_read_write
#  RUN           vfio_pci_device_test.reset ...
#      SKIP      Device does not support reset
ok 4 vfio_pci_device_test.reset # SKIP Device does not support reset
"""


def test_the_listing_gives_every_variant_with_every_test_even_past_the_columns() -> None:
    assert parse_listing(LISTING) == [
        ("vfio_dma_mapping_mmio_test", "vfio_type1_iommu", "map_full_bar"),
        ("vfio_dma_mapping_mmio_test", "vfio_type1_iommu", "map_partial_bar"),
        ("vfio_dma_mapping_mmio_test", "iommufd", "map_full_bar"),
        ("vfio_dma_mapping_mmio_test", "iommufd", "map_partial_bar"),
        ("vfio_pci_device_test", "", "config_space_read_write"),
        ("vfio_pci_device_test", "", "reset"),
    ]


def test_tap_results_keep_skip_reasons_and_failure_messages() -> None:
    results = parse_tap(TAP)
    assert results["vfio_pci_device_test.reset"] == ("skip", "Device does not support reset")
    status, reason = results["vfio_dma_mapping_mmio_test.vfio_type1_iommu.map_partial_bar"]
    assert status == "fail" and reason is not None and "open(/dev/vfio/2) failed" in reason
    assert results["vfio_pci_device_test.config_space_read_write"] == ("pass", None)


def test_every_listed_case_gets_a_status_excluded_variants_skip_and_missing_ones_fail() -> None:
    run = ProgramRun("p", "membar", "0000:00:03.0", exit_status=1, listing=LISTING, excluded_variants=["iommufd"])
    run.tap = TAP.split("#  RUN           vfio_pci_device_test.reset")[0]  # the program died before reset
    run.settle()
    statuses = {case.name: (case.status, case.reason) for case in run.cases}
    assert statuses["vfio_dma_mapping_mmio_test.iommufd.map_full_bar"] == ("skip", NO_IOMMUFD)
    assert statuses["vfio_pci_device_test.reset"][0] == "fail"
    assert "ended first" in str(statuses["vfio_pci_device_test.reset"][1])
    assert run.counts() == {"pass": 2, "fail": 2, "skip": 2}
    assert run.status == "fail"


def test_a_program_that_skips_itself_is_a_skip() -> None:
    run = ProgramRun("vfio_pci_driver_test", "membar", "0000:00:03.0", exit_status=4, listing="No driver found\n")
    run.settle()
    assert run.cases == [] and run.status == "skip"


#: What CI runs, in this order.
CI_PLAN = (("vfio_pci_device_test", "membar"), ("vfio_pci_driver_test", "ioat"))
#: Why a selftest may skip here: only for what the guest kernel lacks, never for what a device could give.
ALLOWED_SKIPS = (NO_IOMMUFD,)


@pytest.fixture
def selftests(missing: Callable[[str], NoReturn]) -> Selftests:
    """The selftests ``make guest`` built (``make kselftest-guest``)."""
    try:
        return Selftests.find()
    except FileNotFoundError as exc:
        missing(str(exc))


@pytest.fixture
def kselftest_guest(selftests: Selftests, missing: Callable[[str], NoReturn]) -> GuestArtefacts:
    """The kernel set the selftests were built from."""
    try:
        return GuestArtefacts.find(selftests.kernel)
    except FileNotFoundError as exc:
        missing(str(exc))


async def test_the_vfio_selftests_pass_against_membar_and_ioat(
    qemu_binary: Path, selftests: Selftests, kselftest_guest: GuestArtefacts, tmp_path: Path
) -> None:
    result = await run_kselftests(kselftest_guest, selftests, plan=CI_PLAN, workdir=tmp_path, binary=qemu_binary)
    report = write_report(result, tmp_path)
    print(summary(result))
    assert result.error is None, summary(result)
    assert [(run.program, run.device) for run in result.programs] == list(CI_PLAN)
    # First, because every copy to an IOVA the server never got fails after it: the driver test's fixture
    # keeps 513 mappings (2 MiB each), so libvfio-user must hold more than its historical 16 regions.
    assert not result.qemu_refusals and not result.server_refusals, summary(result)
    for run in result.programs:
        assert run.cases, f"{run.program} reported no cases:\n{run.tap}"
        for case in run.cases:
            assert case.status == "pass" or (case.status == "skip" and case.reason in ALLOWED_SKIPS), (
                f"{case.name}: {case.status}: {case.reason}\n{summary(result)}"
            )
    driver = next(run for run in result.programs if run.program == "vfio_pci_driver_test")
    ran = {case.test for case in driver.cases if case.status == "pass"}
    assert {"memcpy_success", "memcpy_to_unmapped_iova", "send_msi", "mix_and_match", "memcpy_storm"} <= ran
    # The unmapped-IOVA cases halted the channel with an address error, as the driver expects of the hardware.
    errors = result.counts["ioat"].violations
    assert errors["ioat channel error SRC_ADDR"] and errors["ioat channel error DEST_ADDR"]
    assert json.loads((tmp_path / "kselftest.json").read_text())["passed"] is True
    assert report["selftests"]["source_version"] == selftests.source_version
