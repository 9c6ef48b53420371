"""ctypes prototypes for libvfio-user, declared in one table.

libvfio-user's ABI moves between revisions (``vfu_setup_device_dma`` gained an
argument in 2026, for one), and ctypes calls a function with whatever
arguments it is handed.  So every prototype vdev uses is written down once,
in :data:`PROTOTYPES`, against the revisions listed in
:data:`SUPPORTED_REVISIONS`; loading a library built from another revision is
refused instead of crashing later in C.

Callback types deliberately do not use ctypes' ``use_errno`` swapping: a
callback reports failure to the library by returning -1 with C's ``errno``
set, and :func:`set_c_errno` writes C's errno directly, immediately before
the callback returns.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vdev import deps

#: libvfio-user revisions (from QEMU's subprojects/libvfio-user.wrap) whose
#: ABI matches :data:`PROTOTYPES`.
SUPPORTED_REVISIONS: frozenset[str] = frozenset({"0b28d205572c80b568a1003db2c8f37ca333e4d7"})

ctx_p = ctypes.c_void_p
loff_t = ctypes.c_int64


class Iovec(ctypes.Structure):
    """``struct iovec``."""

    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class DmaInfo(ctypes.Structure):
    """``vfu_dma_info_t``: one client memory region offered by DMA_MAP."""

    _fields_ = [
        ("iova", Iovec),
        ("vaddr", ctypes.c_void_p),
        ("mapping", Iovec),
        ("page_size", ctypes.c_size_t),
        ("prot", ctypes.c_uint32),
    ]


class DmaSg(ctypes.Structure):
    """``struct dma_sg`` (lib/dma.h): opaque in the API, but vdev must correct one field.

    In this revision message-based DMA (``vfu_sgl_read``/``vfu_sgl_write``)
    sends ``dma_addr`` — the start of the client's DMA region — and ignores
    ``offset``, so any transfer not at a region's first byte reaches the
    wrong address.  vdev folds the offset into ``dma_addr`` before the
    transfer.  :func:`load` checks the size against ``dma_sg_size()``.
    """

    _fields_ = [
        ("dma_addr", ctypes.c_uint64),
        ("region", ctypes.c_int),
        ("length", ctypes.c_uint64),
        ("offset", ctypes.c_uint64),
        ("writeable", ctypes.c_bool),
    ]


LOG_CB = ctypes.CFUNCTYPE(None, ctx_p, ctypes.c_int, ctypes.c_char_p)
REGION_ACCESS_CB = ctypes.CFUNCTYPE(ctypes.c_ssize_t, ctx_p, ctypes.c_void_p, ctypes.c_size_t, loff_t, ctypes.c_bool)
RESET_CB = ctypes.CFUNCTYPE(ctypes.c_int, ctx_p, ctypes.c_int)
QUIESCE_CB = ctypes.CFUNCTYPE(ctypes.c_int, ctx_p)
DMA_CB = ctypes.CFUNCTYPE(None, ctx_p, ctypes.POINTER(DmaInfo))
IRQ_STATE_CB = ctypes.CFUNCTYPE(None, ctx_p, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_bool)

_int, _u32, _u16, _u8, _size = ctypes.c_int, ctypes.c_uint32, ctypes.c_uint16, ctypes.c_uint8, ctypes.c_size_t

#: name -> (restype, argtypes).  The only place a libvfio-user signature is written.
PROTOTYPES: dict[str, tuple[Any, list[Any]]] = {
    "vfu_create_ctx": (ctx_p, [_int, ctypes.c_char_p, _int, ctypes.c_void_p, _int]),
    "vfu_realize_ctx": (_int, [ctx_p]),
    "vfu_attach_ctx": (_int, [ctx_p]),
    "vfu_get_poll_fd": (_int, [ctx_p]),
    "vfu_run_ctx": (_int, [ctx_p]),
    "vfu_destroy_ctx": (None, [ctx_p]),
    "vfu_setup_log": (_int, [ctx_p, LOG_CB, _int]),
    "vfu_setup_region": (
        _int,
        [ctx_p, _int, _size, REGION_ACCESS_CB, _int, ctypes.POINTER(Iovec), _u32, _int, ctypes.c_uint64],
    ),
    "vfu_setup_device_reset_cb": (_int, [ctx_p, RESET_CB]),
    "vfu_setup_device_quiesce_cb": (None, [ctx_p, QUIESCE_CB]),
    "vfu_device_quiesced": (_int, [ctx_p, _int]),
    "vfu_setup_device_dma": (_int, [ctx_p, DMA_CB, DMA_CB]),
    "vfu_setup_device_nr_irqs": (_int, [ctx_p, _int, _u32]),
    "vfu_setup_irq_state_callback": (_int, [ctx_p, _int, IRQ_STATE_CB]),
    "vfu_irq_trigger": (_int, [ctx_p, _u32]),
    "dma_sg_size": (_size, []),
    "vfu_addr_to_sgl": (_int, [ctx_p, ctypes.c_void_p, _size, ctypes.c_void_p, _size, _int]),
    "vfu_sgl_read": (_int, [ctx_p, ctypes.c_void_p, _size, ctypes.c_void_p]),
    "vfu_sgl_write": (_int, [ctx_p, ctypes.c_void_p, _size, ctypes.c_void_p]),
    "vfu_pci_init": (_int, [ctx_p, _int, _int, _int]),
    "vfu_pci_set_id": (None, [ctx_p, _u16, _u16, _u16, _u16]),
    "vfu_pci_set_class": (None, [ctx_p, _u8, _u8, _u8]),
}


class LibraryError(RuntimeError):
    """libvfio-user is missing, unloadable, or of a revision vdev does not support."""


@dataclass(frozen=True)
class Library:
    """A loaded libvfio-user with every prototype of :data:`PROTOTYPES` applied."""

    path: Path
    revision: str
    cdll: ctypes.CDLL

    def __getattr__(self, name: str) -> Any:
        if name in PROTOTYPES:
            return getattr(self.cdll, name)
        raise AttributeError(f"{name} is not declared in vdev.libvfio_user.bindings.PROTOTYPES")


def _read_revision(path: Path) -> str:
    configured = os.environ.get("VDEV_LIBVFIO_USER_REVISION")
    if configured:
        return configured.strip()
    revision_file = deps.libvfio_user_revision_file()
    try:
        return revision_file.read_text().strip()
    except OSError:
        raise LibraryError(
            f"cannot tell which libvfio-user revision {path} is: {revision_file} is missing "
            "(set VDEV_LIBVFIO_USER_REVISION for a library you built yourself)"
        ) from None


def check(path: Path | None = None) -> tuple[Path, str]:
    """Locate the library and its revision without loading it; raise :class:`LibraryError`."""
    path = path or deps.libvfio_user_path()
    if not path.exists():
        raise LibraryError(f"libvfio-user not found at {path}; run `{deps.PROVISION_COMMAND}`")
    revision = _read_revision(path)
    if revision not in SUPPORTED_REVISIONS:
        raise LibraryError(
            f"libvfio-user at {path} is revision {revision}; vdev's bindings are declared for "
            f"{', '.join(sorted(SUPPORTED_REVISIONS))}"
        )
    return path, revision


_loaded: Library | None = None


def load() -> Library:
    """Load libvfio-user once per process (``$VDEV_LIBVFIO_USER`` or the deps cache)."""
    global _loaded
    if _loaded is None:
        path, revision = check()
        try:
            cdll = ctypes.CDLL(str(path), use_errno=True)
        except OSError as exc:
            raise LibraryError(f"cannot load libvfio-user from {path}: {exc}") from None
        for name, (restype, argtypes) in PROTOTYPES.items():
            try:
                function = getattr(cdll, name)
            except AttributeError:
                raise LibraryError(f"{path} has no symbol {name}") from None
            function.restype = restype
            function.argtypes = argtypes
        if cdll.dma_sg_size() != ctypes.sizeof(DmaSg):
            raise LibraryError(
                f"{path}: struct dma_sg is {cdll.dma_sg_size()} bytes, vdev expects {ctypes.sizeof(DmaSg)}"
            )
        _loaded = Library(path=path, revision=revision, cdll=cdll)
    return _loaded


# No use_errno here: ctypes must not swap errno around this call, or it would
# overwrite the value written through the returned pointer.
_libc = ctypes.CDLL(None)
_errno_location = _libc.__errno_location
_errno_location.restype = ctypes.POINTER(ctypes.c_int)
_errno_location.argtypes = []


def set_c_errno(value: int) -> None:
    """Set C's ``errno`` now, for a callback about to return -1 to libvfio-user."""
    _errno_location()[0] = value
