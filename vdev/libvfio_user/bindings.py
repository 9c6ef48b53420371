"""ctypes prototypes for libvfio-user, declared in one table.

libvfio-user's ABI moves between revisions (``vfu_setup_device_dma`` gained an
argument in 2026, for one), and ctypes calls a function with whatever
arguments it is handed.  So every prototype vdev uses is written down once,
in :data:`PROTOTYPES`, against the revisions listed in
:data:`SUPPORTED_REVISIONS`; loading a library built from another revision is
refused instead of crashing later in C.

``make deps`` builds that revision with vdev's own patch series
(``tools/libvfio-user-patches``), which fixes bugs QEMU hits and adds a few
functions.  Each patch exports a ``vdev_patch_<name>`` string, so a loaded
library says which of :data:`FIXES` it has.  A library without them (a
user's own build) still loads and serves; what needs a missing patch raises
:class:`MissingFixError`, naming the patch.

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
from typing import Any, NamedTuple

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
    """``struct dma_sg`` (lib/dma.h): opaque in the API, but vdev may have to correct one field.

    Unpatched, this revision's message-based DMA (``vfu_sgl_read``/
    ``vfu_sgl_write``) sends ``dma_addr`` — the start of the client's DMA
    region — and ignores ``offset``, so any transfer not at a region's first
    byte reaches the wrong address.  Without the ``sgl_offset`` fix vdev
    folds the offset into ``dma_addr`` before the transfer.  :func:`load`
    checks the size against ``dma_sg_size()``.
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


@dataclass(frozen=True)
class Fix:
    """One patch of vdev's libvfio-user series, as a built library shows it."""

    #: Short name; the patch exports the string ``vdev_patch_<name>``.
    name: str
    #: The patch file in ``tools/libvfio-user-patches``.
    patch: str
    #: What it fixes or adds, in a few words.
    what: str

    @property
    def marker(self) -> str:
        return f"vdev_patch_{self.name}"


#: vdev's patches to libvfio-user, in the order ``make deps`` applies them.
FIXES: tuple[Fix, ...] = (
    Fix("region_fd", "0001-Send-one-fd-per-region-in-GET_REGION_INFO.patch", "one fd per region in GET_REGION_INFO"),
    Fix(
        "irq_err_req",
        "0002-Keep-ERR-and-REQ-eventfds-apart-from-interrupt-vecto.patch",
        "ERR and REQ eventfds kept apart from interrupt vector 0",
    ),
    Fix(
        "irq_trigger_err_req",
        "0003-Add-vfu_irq_trigger_err-and-vfu_irq_trigger_req.patch",
        "signalling the ERR and REQ interrupts",
    ),
    Fix(
        "dma_regions",
        "0004-Allow-65535-DMA-regions-allocated-on-demand-and-adve.patch",
        "65535 DMA regions, advertised as max_dma_maps",
    ),
    Fix(
        "sgl_offset",
        "0005-Send-message-DMA-to-the-offset-within-the-DMA-region.patch",
        "message DMA at the offset within a DMA region",
    ),
    Fix(
        "dma_map_dup_fd",
        "0006-Close-the-fd-of-a-repeated-identical-DMA_MAP.patch",
        "no fd leak on a repeated DMA_MAP",
    ),
    Fix(
        "listen_fd",
        "0007-Add-vfu_create_ctx_from_fd-serve-on-an-inherited-lis.patch",
        "serving on an inherited listening socket",
    ),
)
FIXES_BY_NAME: dict[str, Fix] = {fix.name: fix for fix in FIXES}


class Prototype(NamedTuple):
    """A C signature, and the fix that adds the function (None: the revision has it)."""

    restype: Any
    argtypes: list[Any]
    needs: str | None = None


#: name -> prototype.  The only place a libvfio-user signature is written.
PROTOTYPES: dict[str, Prototype] = {
    "vfu_create_ctx": Prototype(ctx_p, [_int, ctypes.c_char_p, _int, ctypes.c_void_p, _int]),
    "vfu_create_ctx_from_fd": Prototype(ctx_p, [_int, _int, _int, ctypes.c_void_p, _int], needs="listen_fd"),
    "vfu_realize_ctx": Prototype(_int, [ctx_p]),
    "vfu_attach_ctx": Prototype(_int, [ctx_p]),
    "vfu_get_poll_fd": Prototype(_int, [ctx_p]),
    "vfu_run_ctx": Prototype(_int, [ctx_p]),
    "vfu_destroy_ctx": Prototype(None, [ctx_p]),
    "vfu_setup_log": Prototype(_int, [ctx_p, LOG_CB, _int]),
    "vfu_setup_region": Prototype(
        _int,
        [ctx_p, _int, _size, REGION_ACCESS_CB, _int, ctypes.POINTER(Iovec), _u32, _int, ctypes.c_uint64],
    ),
    "vfu_setup_device_reset_cb": Prototype(_int, [ctx_p, RESET_CB]),
    "vfu_setup_device_quiesce_cb": Prototype(None, [ctx_p, QUIESCE_CB]),
    "vfu_device_quiesced": Prototype(_int, [ctx_p, _int]),
    "vfu_setup_device_dma": Prototype(_int, [ctx_p, DMA_CB, DMA_CB]),
    "vfu_setup_device_nr_irqs": Prototype(_int, [ctx_p, _int, _u32]),
    "vfu_setup_irq_state_callback": Prototype(_int, [ctx_p, _int, IRQ_STATE_CB]),
    "vfu_irq_trigger": Prototype(_int, [ctx_p, _u32]),
    "vfu_irq_trigger_err": Prototype(_int, [ctx_p], needs="irq_trigger_err_req"),
    "vfu_irq_trigger_req": Prototype(_int, [ctx_p], needs="irq_trigger_err_req"),
    "dma_sg_size": Prototype(_size, []),
    "vfu_addr_to_sgl": Prototype(_int, [ctx_p, ctypes.c_void_p, _size, ctypes.c_void_p, _size, _int]),
    "vfu_sgl_read": Prototype(_int, [ctx_p, ctypes.c_void_p, _size, ctypes.c_void_p]),
    "vfu_sgl_write": Prototype(_int, [ctx_p, ctypes.c_void_p, _size, ctypes.c_void_p]),
    "vfu_pci_init": Prototype(_int, [ctx_p, _int, _int, _int]),
    "vfu_pci_set_id": Prototype(None, [ctx_p, _u16, _u16, _u16, _u16]),
    "vfu_pci_set_class": Prototype(None, [ctx_p, _u8, _u8, _u8]),
}


class LibraryError(RuntimeError):
    """libvfio-user is missing, unloadable, or of a revision vdev does not support."""


class MissingFixError(LibraryError):
    """Something needs one of vdev's libvfio-user patches, and the loaded library lacks it."""

    def __init__(self, path: Path, fix: Fix) -> None:
        super().__init__(
            f"{path} lacks vdev's libvfio-user patch {fix.patch} ({fix.what}); "
            f"`{deps.PROVISION_COMMAND}` builds libvfio-user with it"
        )
        self.fix = fix


@dataclass(frozen=True)
class Library:
    """A loaded libvfio-user with every prototype of :data:`PROTOTYPES` it has applied."""

    path: Path
    revision: str
    cdll: ctypes.CDLL
    #: The names of the :data:`FIXES` this library has.
    fixes: frozenset[str]

    def has(self, fix: str) -> bool:
        """Whether the library has fix ``fix`` (a name from :data:`FIXES`)."""
        return fix in self.fixes

    def require(self, fix: str) -> None:
        """Raise :class:`MissingFixError` unless the library has fix ``fix``."""
        if fix not in self.fixes:
            raise MissingFixError(self.path, FIXES_BY_NAME[fix])

    def __getattr__(self, name: str) -> Any:
        prototype = PROTOTYPES.get(name)
        if prototype is None:
            raise AttributeError(f"{name} is not declared in vdev.libvfio_user.bindings.PROTOTYPES")
        if prototype.needs is not None:
            self.require(prototype.needs)
        return getattr(self.cdll, name)


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
        _loaded = open_library(*check())
    return _loaded


def open_library(path: Path, revision: str) -> Library:
    """Load the libvfio-user at ``path`` (of ``revision``), whatever :func:`load` uses.

    For comparing builds in one process, as the suite does with the
    unpatched one; serving code takes its library from :func:`load`.
    """
    try:
        cdll = ctypes.CDLL(str(path), use_errno=True)
    except OSError as exc:
        raise LibraryError(f"cannot load libvfio-user from {path}: {exc}") from None
    return Library(path=path, revision=revision, cdll=cdll, fixes=_declare(cdll, path))


def _declare(cdll: ctypes.CDLL, path: Path) -> frozenset[str]:
    """Apply :data:`PROTOTYPES` to ``cdll``; return the fixes it has.

    A function that a fix adds may be absent (the fix is); any other missing
    function means the library is not the revision it claims.
    """
    fixes = frozenset(fix.name for fix in FIXES if hasattr(cdll, fix.marker))
    for name, prototype in PROTOTYPES.items():
        try:
            function = getattr(cdll, name)
        except AttributeError:
            if prototype.needs is not None and prototype.needs not in fixes:
                continue
            raise LibraryError(f"{path} has no symbol {name}") from None
        function.restype = prototype.restype
        function.argtypes = prototype.argtypes
    if cdll.dma_sg_size() != ctypes.sizeof(DmaSg):
        raise LibraryError(f"{path}: struct dma_sg is {cdll.dma_sg_size()} bytes, vdev expects {ctypes.sizeof(DmaSg)}")
    return fixes


# No use_errno here: ctypes must not swap errno around this call, or it would
# overwrite the value written through the returned pointer.
_libc = ctypes.CDLL(None)
_errno_location = _libc.__errno_location
_errno_location.restype = ctypes.POINTER(ctypes.c_int)
_errno_location.argtypes = []


def set_c_errno(value: int) -> None:
    """Set C's ``errno`` now, for a callback about to return -1 to libvfio-user."""
    _errno_location()[0] = value
