"""The httpx async transport: ``transport = "httpx"``."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterable, AsyncIterator, Iterator
from typing import TYPE_CHECKING

import httpx

from .._exceptions import (
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
)

if TYPE_CHECKING:
    from .._backend import Backend
    from .._config import TimeoutsConfig
    from .._types import RawHeaders


@contextlib.contextmanager
def map_httpx_exceptions(pool: str) -> Iterator[None]:
    """Turn httpx's exceptions into the most specific balancekit one."""
    try:
        yield
    except httpx.ConnectTimeout as exc:
        raise UpstreamTimeout(
            "upstream did not accept the connection in time", pool=pool, request_sent=False
        ) from exc
    except httpx.TimeoutException as exc:
        raise UpstreamTimeout("upstream timed out", pool=pool) from exc
    except httpx.ConnectError as exc:
        raise UpstreamConnectError("upstream refused the connection", pool=pool) from exc
    except (httpx.RemoteProtocolError, httpx.DecodingError) as exc:
        raise UpstreamProtocolError("upstream sent a malformed response", pool=pool) from exc
    except (httpx.TransportError, httpx.StreamError, OSError) as exc:
        raise UpstreamError("upstream connection failed", pool=pool) from exc


class HttpxResponse:
    __slots__ = ("_pool", "_response", "headers", "status")

    def __init__(self, response: httpx.Response, pool: str) -> None:
        self._response = response
        self._pool = pool
        self.status = response.status_code
        self.headers: RawHeaders = list(response.headers.raw)

    async def stream(self) -> AsyncIterator[bytes]:
        with map_httpx_exceptions(self._pool):
            async for chunk in self._response.aiter_raw():
                yield chunk

    async def aclose(self) -> None:
        await self._response.aclose()


class HttpxTransport:
    name = "httpx"

    def __init__(self) -> None:
        self._client: httpx.AsyncClient | None = None
        self._timeouts: dict[TimeoutsConfig, dict[str, float | None]] = {}

    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                limits=httpx.Limits(max_connections=None, max_keepalive_connections=100),
                follow_redirects=False,
                trust_env=False,
            )
        return self._client

    def _timeout(self, timeouts: TimeoutsConfig) -> dict[str, float | None]:
        found = self._timeouts.get(timeouts)
        if found is None:
            found = self._timeouts[timeouts] = httpx.Timeout(
                connect=timeouts.connect, read=timeouts.read, write=timeouts.write, pool=None
            ).as_dict()
        return found

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
    ) -> HttpxResponse:
        # A bare Request carries none of the client's default headers.
        request = httpx.Request(
            method,
            backend.origin + backend.base_path + target,
            headers=headers,
            content=body,
            extensions={"timeout": self._timeout(timeouts)},
        )
        with map_httpx_exceptions(pool):
            response = await self.client().send(request, stream=True)
        return HttpxResponse(response, pool)

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None
