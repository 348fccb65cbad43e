"""Stores: small shared state, chosen by URL scheme.

Built in: ``memory://`` (the default: one process) and ``redis://`` /
``rediss://`` (every process sharing the server). A store class has a
``name`` (its scheme), takes the URL, and has ``get(key, *, ttl=None)``
(``ttl`` renews the expiry), ``set(key, value, *, ttl)``, ``delete(key)``,
``close()`` and their ``a``-prefixed async twins.

The balancer never calls a store directly: :class:`GuardedStore` stands in
front, so that a store outage never turns into a failed request.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from ..hookspecs import hookimpl
from .memory import MemoryStore
from .redis import RedisStore, SecureRedisStore

__all__ = ["GuardedStore", "MemoryStore", "RedisStore", "SecureRedisStore"]

logger = logging.getLogger("balancekit")

#: Seconds between attempts on a store that failed: doubling up to the cap.
BACKOFF_START = 0.5
BACKOFF_MAX = 30.0


class GuardedStore:
    """A store that fails soft: while its backend is down, reads find
    nothing and writes are dropped, so requests are balanced unpinned.

    The first failure is logged once (not once per request), the store is
    left alone for a backoff that doubles to ``BACKOFF_MAX``, then tried
    again by the next operation; recovery is logged too.
    """

    def __init__(self, store: Any, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.url = getattr(store, "url", "")
        self._clock = clock
        self._lock = threading.Lock()
        self._retry_at = 0.0
        self._backoff = 0.0
        self.failures = 0

    @property
    def down(self) -> bool:
        return self._backoff > 0

    def _available(self) -> bool:
        return not self._backoff or self._clock() >= self._retry_at

    def _failed(self, exc: BaseException) -> None:
        with self._lock:
            self.failures += 1
            first = not self._backoff
            self._backoff = min(self._backoff * 2, BACKOFF_MAX) if self._backoff else BACKOFF_START
            self._retry_at = self._clock() + self._backoff
        if first:
            logger.error(
                "store %s unreachable (%s): balancing unpinned until it is back",
                _safe_url(self.url),
                exc,
            )

    def _worked(self) -> None:
        if self._backoff:
            with self._lock:
                self._backoff = 0.0
            logger.warning("store %s is back", _safe_url(self.url))

    # A store is a plugin: whatever it raises (StoreError from the built-in
    # ones) is an outage to ride out, never a failed request.

    def get(self, key: str, *, ttl: float | None = None) -> Any:
        if not self._available():
            return None
        try:
            value = self.store.get(key, ttl=ttl)
        except Exception as exc:
            self._failed(exc)
            return None
        self._worked()
        return value

    def set(self, key: str, value: str, *, ttl: float) -> None:
        if not self._available():
            return
        try:
            self.store.set(key, value, ttl=ttl)
        except Exception as exc:
            self._failed(exc)
            return
        self._worked()

    async def aget(self, key: str, *, ttl: float | None = None) -> Any:
        if not self._available():
            return None
        try:
            value = await self.store.aget(key, ttl=ttl)
        except Exception as exc:
            self._failed(exc)
            return None
        self._worked()
        return value

    async def aset(self, key: str, value: str, *, ttl: float) -> None:
        if not self._available():
            return
        try:
            await self.store.aset(key, value, ttl=ttl)
        except Exception as exc:
            self._failed(exc)
            return
        self._worked()

    def close(self) -> None:
        try:
            self.store.close()
        except Exception:  # at shutdown: nothing left to protect
            logger.debug("store %s failed to close", _safe_url(self.url), exc_info=True)

    async def aclose(self) -> None:
        try:
            await self.store.aclose()
        except Exception:  # at shutdown: nothing left to protect
            logger.debug("store %s failed to close", _safe_url(self.url), exc_info=True)


def _safe_url(url: str) -> str:
    """``url`` without a password, for logs."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = "***@" + rest.rsplit("@", 1)[1]
    return scheme + sep + rest


@hookimpl(trylast=True)
def balancekit_register_stores() -> list[type[Any]]:
    return [MemoryStore, RedisStore, SecureRedisStore]
