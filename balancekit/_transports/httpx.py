"""The httpx async transport: ``transport = "httpx"``, and the sync engine's
``httpx`` option.

httpx takes its TLS settings per client, so a pool's TLS (``Backend.tls``)
gets a client of its own, made on its first request and kept: pools with
different TLS never share a connection. Its ``server_name`` goes with each
request as httpcore's ``sni_hostname`` extension (the name sent and verified).
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterable, Iterable
from typing import TYPE_CHECKING, Any

import httpx

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
    from .._upstream_tls import UpstreamTLS


#: What the transport catches from httpx; translate_error maps each.
HTTPX_ERRORS = (httpx.TransportError, httpx.StreamError, httpx.DecodingError, OSError)


def translate_error(exc: BaseException) -> ProxyError:
    """The most specific balancekit error for one of httpx's."""
    if isinstance(exc, httpx.ConnectTimeout):
        return UpstreamTimeout.connecting()
    if isinstance(exc, httpx.TimeoutException):
        return UpstreamTimeout()
    if isinstance(exc, httpx.ConnectError):
        return UpstreamConnectError()
    if isinstance(exc, httpx.RemoteProtocolError | httpx.DecodingError):
        return UpstreamProtocolError()
    return UpstreamError()


class HttpxResponse:
    __slots__ = ("_chunks", "_response", "headers", "status")

    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        self._chunks = response.aiter_raw()
        self.status = response.status_code
        self.headers: RawHeaders = list(response.headers.raw)

    async def read(self) -> bytes:
        try:
            return await anext(self._chunks, b"")
        except HTTPX_ERRORS as exc:
            raise translate_error(exc) from exc

    async def aclose(self) -> None:
        connection = _h11_connection(self._response)
        if connection is not None and connection._h11_state.trailing_data[0]:
            # The upstream sent bytes after its response. httpcore would pool
            # this connection and hand them to the next request as its
            # answer; aiohttp drops such a connection, and so do we.
            await connection.aclose()
        await self._response.aclose()


def _h11_connection(response: httpx.Response) -> Any:
    """httpcore's HTTP/1.1 connection under ``response``, or None.

    This reaches into httpx and httpcore internals (checked with httpx 0.28
    and httpcore 1.0); when their shape changes, the check is skipped.
    """
    stream: Any = response.stream
    for attribute in ("_stream", "_httpcore_stream", "_stream", "_connection"):
        stream = getattr(stream, attribute, None)
        if stream is None:
            return None
    return stream if hasattr(stream, "_h11_state") else None


class HttpxSyncResponse:
    __slots__ = ("_chunks", "_response", "headers", "status")

    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        self._chunks = response.iter_raw()
        self.status = response.status_code
        self.headers: RawHeaders = list(response.headers.raw)

    def read(self) -> bytes:
        try:
            return next(self._chunks, b"")
        except HTTPX_ERRORS as exc:
            raise translate_error(exc) from exc

    def close(self) -> None:
        connection = _h11_connection(self._response)
        if connection is not None and connection._h11_state.trailing_data[0]:
            connection.close()  # as HttpxResponse.aclose
        self._response.close()


#: The client both httpx transports use: no pool limit, no environment, no redirects.
_CLIENT_OPTIONS: dict[str, Any] = {
    "limits": httpx.Limits(max_connections=None, max_keepalive_connections=100),
    "follow_redirects": False,
    "trust_env": False,
}


class _Timeouts:
    """httpx's timeout extension per pool config, made once per config."""

    def __init__(self) -> None:
        self._timeouts: dict[int, tuple[TimeoutsConfig, dict[str, float | None]]] = {}

    def _timeout(self, timeouts: TimeoutsConfig) -> dict[str, float | None]:
        found = self._timeouts.get(id(timeouts))
        if found is None:
            timeout = httpx.Timeout(
                connect=timeouts.connect, read=timeouts.read, write=timeouts.write, pool=None
            ).as_dict()
            found = self._timeouts[id(timeouts)] = (timeouts, timeout)
        return found[1]

    def _request(
        self,
        backend: Backend,
        method: str,
        target: str,
        headers: RawHeaders,
        body: Any,
        timeouts: TimeoutsConfig,
    ) -> httpx.Request:
        extensions: dict[str, Any] = {"timeout": self._timeout(timeouts)}
        tls = backend.tls
        if tls is not None and tls.server_name is not None:
            extensions["sni_hostname"] = tls.server_name
        # A bare Request carries none of the client's default headers.
        return httpx.Request(
            method,
            backend.origin + backend.base_path + target,
            headers=headers,
            content=body,
            extensions=extensions,
        )


class HttpxSyncTransport(_Timeouts):
    """``httpx.Client`` for the sync engine; one per process (see the engine)."""

    name = "httpx"

    def __init__(self) -> None:
        super().__init__()
        self.client = httpx.Client(**_CLIENT_OPTIONS)
        self._tls_clients: dict[UpstreamTLS, httpx.Client] = {}
        self._lock = threading.Lock()

    def _tls_client(self, tls: UpstreamTLS) -> httpx.Client:
        client = self._tls_clients.get(tls)
        if client is None:
            with self._lock:  # the engine's threads share the transport
                client = self._tls_clients.get(tls)
                if client is None:
                    client = httpx.Client(verify=tls.context, **_CLIENT_OPTIONS)
                    self._tls_clients[tls] = client
        return client

    def send(
        self,
        backend: Backend,
        method: str,
        target: str,
        headers: RawHeaders,
        body: Iterable[bytes] | None,
        timeouts: TimeoutsConfig,
    ) -> HttpxSyncResponse:
        request = self._request(backend, method, target, headers, body, timeouts)
        tls = backend.tls
        client = self.client if tls is None else self._tls_client(tls)
        try:
            response = client.send(request, stream=True)
        except HTTPX_ERRORS as exc:
            raise translate_error(exc) from exc
        return HttpxSyncResponse(response)

    def close(self) -> None:
        self.client.close()
        with self._lock:
            clients, self._tls_clients = self._tls_clients, {}
        for client in clients.values():
            client.close()


class HttpxTransport(_Timeouts):
    name = "httpx"

    def __init__(self) -> None:
        super().__init__()
        self._client: httpx.AsyncClient | None = None
        # One event loop uses the transport: no lock.
        self._tls_clients: dict[UpstreamTLS, httpx.AsyncClient] = {}

    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(**_CLIENT_OPTIONS)
        return self._client

    def _tls_client(self, tls: UpstreamTLS) -> httpx.AsyncClient:
        client = self._tls_clients.get(tls)
        if client is None:
            client = self._tls_clients[tls] = httpx.AsyncClient(
                verify=tls.context, **_CLIENT_OPTIONS
            )
        return client

    async def send(
        self,
        backend: Backend,
        method: str,
        target: str,
        headers: RawHeaders,
        body: AsyncIterable[bytes] | None,
        timeouts: TimeoutsConfig,
    ) -> HttpxResponse:
        request = self._request(backend, method, target, headers, body, timeouts)
        tls = backend.tls
        client = self.client() if tls is None else self._tls_client(tls)
        try:
            response = await client.send(request, stream=True)
        except HTTPX_ERRORS as exc:
            raise translate_error(exc) from exc
        return HttpxResponse(response)

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None
        clients, self._tls_clients = self._tls_clients, {}
        for client in clients.values():
            await client.aclose()
