"""The embedded default store: one process's memory."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from urllib.parse import parse_qs, urlsplit


class MemoryStore:
    """A bounded key-value map with per-key TTL and LRU eviction.

    Right for one worker process; several workers each have their own.
    ``memory://?max_entries=N`` sets the bound (default 100,000).
    Safe under threads and tasks (a lock guards every operation, and no
    operation awaits).
    """

    name = "memory"

    def __init__(self, url: str = "memory://", *, max_entries: int = 100_000) -> None:
        query = parse_qs(urlsplit(url).query)
        if "max_entries" in query:
            raw = query["max_entries"][-1]
            if not raw.isdigit() or int(raw) == 0:
                raise ValueError(f"memory:// max_entries must be a positive integer, got {raw!r}")
            max_entries = int(raw)
        self.url = url
        self.max_entries = max_entries
        self._data: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str, *, ttl: float | None = None) -> str | None:
        """The value of ``key``, or None; with ``ttl``, its expiry is renewed."""
        with self._lock:
            item = self._data.get(key)
            if item is None:
                return None
            value, expires = item
            now = time.monotonic()
            if expires <= now:
                del self._data[key]
                return None
            if ttl is not None:
                self._data[key] = (value, now + ttl)
            self._data.move_to_end(key)
            return value

    def set(self, key: str, value: str, *, ttl: float) -> None:
        with self._lock:
            self._data[key] = (value, time.monotonic() + ttl)
            self._data.move_to_end(key)
            while len(self._data) > self.max_entries:
                self._data.popitem(last=False)

    def delete(self, key: str) -> None:
        with self._lock:
            self._data.pop(key, None)

    async def aget(self, key: str, *, ttl: float | None = None) -> str | None:
        return self.get(key, ttl=ttl)

    async def aset(self, key: str, value: str, *, ttl: float) -> None:
        self.set(key, value, ttl=ttl)

    async def adelete(self, key: str) -> None:
        self.delete(key)

    def close(self) -> None:
        return None

    async def aclose(self) -> None:
        return None
