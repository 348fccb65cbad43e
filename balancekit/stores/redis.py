"""``redis://host:port/db`` (and ``rediss://``): state shared by every process.

redis-py's sync client serves the sync engine and any thread; its asyncio
client is made per event loop (its connections belong to the loop that
opened them). Socket timeouts are short: a store that is slow to answer is
treated as down (see ``GuardedStore``), never waited on by a request.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import weakref
from collections.abc import Iterator
from typing import Any

from .._exceptions import StoreError

#: Seconds a store operation may take before it counts as a failure.
SOCKET_TIMEOUT = 0.5


class RedisStore:
    name = "redis"

    def __init__(self, url: str) -> None:
        try:
            import redis
            import redis.asyncio
        except ImportError:  # pragma: no cover - depends on the installed extras
            raise ValueError("redis:// needs redis-py: pip install 'balancekit[redis]'") from None
        self.url = url
        self._options: dict[str, Any] = {
            "socket_timeout": SOCKET_TIMEOUT,
            "socket_connect_timeout": SOCKET_TIMEOUT,
            "decode_responses": True,
        }
        try:
            self._sync = redis.Redis.from_url(url, **self._options)
        except ValueError as exc:
            raise ValueError(f"not a usable Redis URL {url!r}: {exc}") from None
        self._async_module = redis.asyncio
        self._redis_error = redis.RedisError
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any] = (
            weakref.WeakKeyDictionary()
        )
        self._lock = threading.Lock()

    def __str__(self) -> str:
        scheme, sep, rest = self.url.partition("://")
        return scheme + sep + ("***@" + rest.rsplit("@", 1)[1] if "@" in rest else rest)

    @property
    def sync_client(self) -> Any:
        """redis-py's client, for any thread (coordination uses it too)."""
        return self._sync

    def async_client(self) -> Any:
        """redis-py's asyncio client of the running loop."""
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            with self._lock:
                client = self._clients.setdefault(
                    loop, self._async_module.Redis.from_url(self.url, **self._options)
                )
        return client

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """redis-py's errors (and the socket's) as :class:`StoreError`, the
        password kept out of the message."""
        try:
            yield
        except (self._redis_error, OSError) as exc:
            raise StoreError(f"{self}: {exc}") from exc

    # --- sync ------------------------------------------------------------------

    def get(self, key: str, *, ttl: float | None = None) -> str | None:
        sync = self._sync
        with self._errors():
            value = sync.get(key) if ttl is None else sync.getex(key, px=int(ttl * 1000))
        return value if isinstance(value, str) else None  # decode_responses: str

    def set(self, key: str, value: str, *, ttl: float) -> None:
        with self._errors():
            self._sync.set(key, value, px=int(ttl * 1000))

    def delete(self, key: str) -> None:
        with self._errors():
            self._sync.delete(key)

    def close(self) -> None:
        self._sync.close()

    # --- async -----------------------------------------------------------------

    async def aget(self, key: str, *, ttl: float | None = None) -> str | None:
        client = self.async_client()
        with self._errors():
            if ttl is None:
                return await client.get(key)  # type: ignore[no-any-return]
            return await client.getex(key, px=int(ttl * 1000))  # type: ignore[no-any-return]

    async def aset(self, key: str, value: str, *, ttl: float) -> None:
        with self._errors():
            await self.async_client().set(key, value, px=int(ttl * 1000))

    async def adelete(self, key: str) -> None:
        with self._errors():
            await self.async_client().delete(key)

    async def aclose(self) -> None:
        loop = asyncio.get_running_loop()
        with self._lock:
            client = self._clients.pop(loop, None)
        if client is not None:
            await client.aclose()


class SecureRedisStore(RedisStore):
    """``rediss://``: Redis over TLS, verified against the system's CAs."""

    name = "rediss"
