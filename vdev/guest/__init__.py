"""``vdev guest``: boot a Linux guest with vdev devices attached, run a command in it, report what the kernel said.

For kernel engineers testing a driver against a device whose behaviour
Python decides:

* any kernel: a Debian set built by ``make guest`` by name, or one's own
  build by path (:func:`find_kernel`);
* a changed module under test: a patch's modules rebuilt out of tree from
  Debian's source and headers at the image's version (:func:`patched`);
* devices served in-process or external vfio-user servers, optionally bound
  to vfio-pci in the guest; a command, or a shell on the console
  (:func:`run_guest`);
* a kernel problem (``BUG``, ``WARNING``, oops, stalls, …) ends the run and
  is reported with the console lines around it (:class:`GuestOutcome`).

The command line is ``vdev guest``; the pytest fixture ``vdev_guest``
(:mod:`vdev.testing.plugin`) calls :func:`run_guest`.
"""

from vdev.guest.errors import GuestSetupError, KernelError, ModuleBuildError
from vdev.guest.kernels import find_kernel, kernel_sets, own_kernel
from vdev.guest.modules import (
    PatchedModules,
    build_patched_modules,
    extract_directories,
    patch_files,
    patched,
    with_patched_modules,
)
from vdev.guest.session import (
    EXIT_FAILED,
    EXIT_KERNEL_PROBLEM,
    EXIT_TIMEOUT,
    GuestOutcome,
    command_script,
    describe,
    files_from_copy,
    run_guest,
)
from vdev.guest.terminal import run_on_terminal

__all__ = [
    "EXIT_FAILED",
    "EXIT_KERNEL_PROBLEM",
    "EXIT_TIMEOUT",
    "GuestOutcome",
    "GuestSetupError",
    "KernelError",
    "ModuleBuildError",
    "PatchedModules",
    "build_patched_modules",
    "command_script",
    "describe",
    "extract_directories",
    "files_from_copy",
    "find_kernel",
    "kernel_sets",
    "own_kernel",
    "patch_files",
    "patched",
    "run_guest",
    "run_on_terminal",
    "with_patched_modules",
]
