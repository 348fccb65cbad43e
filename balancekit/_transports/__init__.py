"""Upstream HTTP clients behind one small interface.

An engine calls :meth:`AsyncTransport.send` with a backend, a request line
and headers, and an async iterable body; it gets an
:class:`UpstreamResponse` whose body it streams. The sync engine does the
same through :class:`SyncTransport` and :class:`SyncResponse`. Each transport maps its
library's exceptions to balancekit's at one boundary, so the engine never
sees an aiohttp or httpx exception.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, Iterable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from .._backend import Backend
    from .._config import TimeoutsConfig
    from .._types import RawHeaders


class UpstreamResponse(Protocol):
    status: int
    #: Raw response headers in order, repeats (Set-Cookie) kept apart.
    headers: RawHeaders

    async def read(self) -> bytes:
        """The next part of the body as it arrives, ``b""`` at its end.

        Raises balancekit's ``ProxyError`` subclasses.
        """
        ...

    async def aclose(self) -> None:
        """Give the connection back (or drop it, if the body was not read whole)."""
        ...


class AsyncTransport(Protocol):
    name: str

    async def send(
        self,
        backend: Backend,
        method: str,
        target: str,
        headers: RawHeaders,
        body: AsyncIterable[bytes] | None,
        timeouts: TimeoutsConfig,
    ) -> UpstreamResponse:
        """Send a request to ``backend``; ``target`` is path and query, already
        prefixed with the backend's own path. Errors are ``ProxyError``
        subclasses without a pool: the engine names it, at one place."""
        ...

    async def aclose(self) -> None: ...


class SyncResponse(Protocol):
    status: int
    headers: RawHeaders

    def read(self) -> bytes:
        """The next part of the body as it arrives, ``b""`` at its end."""
        ...

    def close(self) -> None:
        """Give the connection back (or drop it, if the body was not read whole)."""
        ...


class SyncTransport(Protocol):
    name: str

    def send(
        self,
        backend: Backend,
        method: str,
        target: str,
        headers: RawHeaders,
        body: Iterable[bytes] | None,
        timeouts: TimeoutsConfig,
    ) -> SyncResponse:
        """As :meth:`AsyncTransport.send`, blocking; safe to call from any thread."""
        ...

    def close(self) -> None: ...


def make_sync_transport(name: str) -> SyncTransport:
    """The sync engine's client: httpx when the config asks for it, else urllib3
    (measured faster as a proxy's client: bench/sync_client_bench.py)."""
    if name == "httpx":
        from .httpx import HttpxSyncTransport

        return HttpxSyncTransport()
    from .urllib3 import Urllib3Transport

    return Urllib3Transport()


def make_async_transport(name: str) -> AsyncTransport:
    """The transport for a config's ``transport`` name (validated at start-up)."""
    if name == "httpx":
        from .httpx import HttpxTransport

        return HttpxTransport()
    if name == "httptools":
        from .httptools import HttptoolsTransport

        return HttptoolsTransport()
    from .aiohttp import AiohttpTransport

    return AiohttpTransport()
