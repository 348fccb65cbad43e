"""``type = "session"``: a session key mapped to a backend in the store."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .cookie import seconds

if TYPE_CHECKING:
    from .._backend import Backend
    from .._pool import Pool
    from .._request import RequestInfo
    from .._types import RawHeaders
    from ..stores import GuardedStore


class SessionPersistence:
    """Pins a session, named by ``key`` (``cookie:NAME`` or ``header:NAME``),
    to a backend kept in the balancer's ``store`` for ``ttl`` seconds, renewed
    on every request of the session (a sliding expiry).

    With a shared store (``redis://``) every worker and host agrees on the
    mapping. A request without the key is balanced unpinned. When the store
    cannot be reached, requests are balanced as if unpinned.
    """

    name = "session"

    def __init__(self, *, pool: str, store: GuardedStore, key: object, ttl: float = 3600) -> None:
        # Options come from a config file: their types are checked here.
        source, _, field = str(key).partition(":")
        if not isinstance(key, str) or source not in ("cookie", "header") or not field:
            raise ValueError(f"key: must be 'cookie:NAME' or 'header:NAME', got {key!r}")
        self.source = source
        self.field = field
        self.ttl = seconds("ttl", ttl)
        self.store = store
        self.prefix = f"balancekit:session:{pool}:"

    def _key(self, request: RequestInfo) -> str | None:
        if self.source == "cookie":
            value = request.cookies.get(self.field)
        else:
            value = request.header(self.field)
        return self.prefix + value if value else None

    @staticmethod
    def _backend(url: Any, pool: Pool) -> Backend | None:
        return pool.find(url) if isinstance(url, str) else None

    def find(self, request: RequestInfo, pool: Pool) -> Backend | None:
        key = self._key(request)
        return None if key is None else self._backend(self.store.get(key, ttl=self.ttl), pool)

    async def afind(self, request: RequestInfo, pool: Pool) -> Backend | None:
        key = self._key(request)
        if key is None:
            return None
        return self._backend(await self.store.aget(key, ttl=self.ttl), pool)

    def remember(self, request: RequestInfo, backend: Backend, pool: Pool) -> RawHeaders:
        key = self._key(request)
        if key is not None:
            self.store.set(key, backend.url, ttl=self.ttl)
        return []

    async def aremember(self, request: RequestInfo, backend: Backend, pool: Pool) -> RawHeaders:
        key = self._key(request)
        if key is not None:
            await self.store.aset(key, backend.url, ttl=self.ttl)
        return []
