"""The default async transport: aiohttp's client, one session per event loop.

A backend with its pool's TLS (``Backend.tls``) passes the pool's context
and server name with each request; aiohttp keys its connection pool by both,
so pools with different TLS never share a connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator
from typing import TYPE_CHECKING

import aiohttp
from yarl import URL

from .._exceptions import (
    ProxyError,
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
)

if TYPE_CHECKING:
    from .._backend import Backend
    from .._config import TimeoutsConfig
    from .._types import RawHeaders

#: Idle keep-alive connections kept per backend (aiohttp's pool is per host).
KEEPALIVE_TIMEOUT = 30.0


#: What the transport catches from aiohttp; translate_error maps each.
AIOHTTP_ERRORS = (aiohttp.ClientError, OSError, TimeoutError)


def translate_error(exc: BaseException) -> ProxyError:
    """The most specific balancekit error for one of aiohttp's.

    A plain function rather than a context manager: it sits on the path of
    every request, and ``try``/``except`` costs nothing until it fires.
    """
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return UpstreamTimeout.connecting()
    if isinstance(exc, aiohttp.SocketTimeoutError | TimeoutError):
        return UpstreamTimeout()
    if isinstance(exc, aiohttp.ClientConnectorError):
        return UpstreamConnectError()
    if isinstance(exc, aiohttp.ClientResponseError | aiohttp.ClientPayloadError):
        return UpstreamProtocolError()
    return UpstreamError()


class _WriteWatch:
    """The write timeout aiohttp lacks: each body chunk must be taken by the
    upstream socket within ``timeout`` seconds, or the request is cancelled."""

    def __init__(self, body: AsyncIterable[bytes], timeout: float) -> None:
        self.body = body
        self.timeout = timeout
        self.task = asyncio.current_task()
        self.fired = False

    def _fire(self) -> None:
        self.fired = True
        if self.task is not None:
            self.task.cancel()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        loop = asyncio.get_running_loop()
        async for chunk in self.body:
            # aiohttp asks for the next chunk only once this one was written
            handle = loop.call_later(self.timeout, self._fire)
            try:
                yield chunk
            finally:
                handle.cancel()


class AiohttpResponse:
    __slots__ = ("_response", "headers", "status")

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self.status = response.status
        self.headers: RawHeaders = list(response.raw_headers)

    async def read(self) -> bytes:
        try:
            return await self._response.content.readany()
        except AIOHTTP_ERRORS as exc:
            raise translate_error(exc) from exc

    async def aclose(self) -> None:
        response = self._response
        if response.content.at_eof():
            response.release()
        else:
            response.close()  # unread body: this connection cannot be reused


class AiohttpTransport:
    name = "aiohttp"

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None
        # by id(): hashing a pydantic model on every request costs more
        self._timeouts: dict[int, tuple[TimeoutsConfig, aiohttp.ClientTimeout]] = {}

    def session(self) -> aiohttp.ClientSession:
        # Created inside the running loop on first use, never at import.
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=0, limit_per_host=0, keepalive_timeout=KEEPALIVE_TIMEOUT
                ),
                cookie_jar=aiohttp.DummyCookieJar(),
                auto_decompress=False,
                skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
                trust_env=False,
            )
            # aiohttp retries an idempotent request once, on the same backend,
            # when a connection fails. The engine decides retries itself (on
            # another backend, within `attempts` and the retry budget), so the
            # hidden one is switched off, as aiohttp's own test client does.
            self._session._retry_connection = False
        return self._session

    def _timeout(self, timeouts: TimeoutsConfig) -> aiohttp.ClientTimeout:
        found = self._timeouts.get(id(timeouts))
        if found is None:
            timeout = aiohttp.ClientTimeout(
                total=None, sock_connect=timeouts.connect, sock_read=timeouts.read
            )
            found = self._timeouts[id(timeouts)] = (timeouts, timeout)
        return found[1]

    async def send(
        self,
        backend: Backend,
        method: str,
        target: str,
        headers: RawHeaders,
        body: AsyncIterable[bytes] | None,
        timeouts: TimeoutsConfig,
    ) -> AiohttpResponse:
        url = URL(backend.origin + backend.base_path + target, encoded=True)
        str_headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in headers]
        watch = None if body is None else _WriteWatch(body, timeouts.write)
        tls = backend.tls
        try:
            response = await self.session().request(
                method,
                url,
                headers=str_headers,
                data=watch.__aiter__() if watch is not None else None,
                allow_redirects=False,
                timeout=self._timeout(timeouts),
                # aiohttp's own defaults (the system's CAs, the URL's host) without one
                ssl=True if tls is None else tls.context,
                server_hostname=None if tls is None else tls.server_name,
            )
        except AIOHTTP_ERRORS as exc:
            raise translate_error(exc) from exc
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if watch is None or not watch.fired or task is None:
                raise
            task.uncancel()
            raise UpstreamTimeout.writing() from None
        return AiohttpResponse(response)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


__all__ = ["AIOHTTP_ERRORS", "AiohttpResponse", "AiohttpTransport", "translate_error"]
