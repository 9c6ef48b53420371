"""An async context manager whose whole life is one ``_lifetime()`` generator, entered once.

QEMU machines (qtest and guest) start in ``__aenter__`` and must always be
stopped in ``__aexit__``, which is easiest to write as one
``@asynccontextmanager`` generator; this base turns that generator into the
object's own ``async with`` protocol.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import Self


class EnteredOnce:
    """Base for objects whose ``async with`` runs ``self._lifetime()``; a second entry is an error."""

    _context: AbstractAsyncContextManager[None] | None = None

    def _lifetime(self) -> AbstractAsyncContextManager[None]:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        if self._context is not None:
            raise RuntimeError(f"a {type(self).__name__} can only be started once")
        self._context = self._lifetime()
        await self._context.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        assert self._context is not None
        return await self._context.__aexit__(exc_type, exc, tb)
