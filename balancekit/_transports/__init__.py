"""Upstream HTTP clients behind one small interface.

An engine calls :meth:`AsyncTransport.send` with a backend, a request line
and headers, and an async iterable body; it gets an
:class:`UpstreamResponse` whose body it streams. Each transport maps its
library's exceptions to balancekit's at one boundary, so the engine never
sees an aiohttp or httpx exception.
"""

from __future__ import annotations

from collections.abc import AsyncIterable
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
        *,
        pool: str,
    ) -> UpstreamResponse:
        """Send a request to ``backend``; ``target`` is path and query, already
        prefixed with the backend's own path."""
        ...

    async def aclose(self) -> None: ...


def make_async_transport(name: str) -> AsyncTransport:
    """The transport for a config's ``transport`` name (validated at start-up)."""
    if name == "httpx":
        from .httpx import HttpxTransport

        return HttpxTransport()
    from .aiohttp import AiohttpTransport

    return AiohttpTransport()
