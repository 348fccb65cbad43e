"""The async proxy engine: one routed ASGI request in, one upstream exchange out.

Bodies stream both ways with back-pressure: the request body is read from
``receive`` only as fast as the upstream takes it, and each upstream chunk
is sent on before the next is read. Every decision (which backend, whether
to retry, which headers) is made by the I/O-free core; this module only
moves bytes and keeps the counters honest on every path out.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from ._decision import is_failure, may_retry
from ._exceptions import NoEligibleBackend, ProxyError, UpstreamProtocolError
from ._forwarding import downstream_response_headers, upstream_request_headers
from ._problem import bad_request, problem_response
from ._request import RequestInfo
from ._transports import make_async_transport

if TYPE_CHECKING:
    from ._backend import Backend
    from ._balancer import Balancer
    from ._pool import Pool
    from ._routing import Route
    from ._transports import UpstreamResponse
    from ._types import RawHeaders, Receive, Scope, Send

logger = logging.getLogger("balancekit")
access_logger = logging.getLogger("balancekit.access")

_WS_SCHEMES = {"ws": "http", "wss": "https"}

#: Limits on a routed request's header block, as Envoy's defaults
#: (max_request_headers_kb = 60, max_headers_count = 100).
MAX_HEADER_BYTES = 60 * 1024
MAX_HEADER_COUNT = 100
HEADERS_TOO_LARGE = "request headers too large"

#: Seconds after the request body is read before client disconnects are
#: watched for; a disconnect is noticed at most this much later.
DISCONNECT_WATCH_DELAY = 0.05


class ClientDisconnected(Exception):
    """The client went away while its request body was being read."""


class RequestBody:
    """The client's body, pulled from ``receive`` as the upstream asks for it.

    ``started`` tells whether any of it was consumed: a body not yet read
    can still be sent to another backend on a retry.
    """

    __slots__ = ("_on_complete", "_receive", "done", "started")

    def __init__(self, receive: Receive, on_complete: Callable[[], None]) -> None:
        self._receive = receive
        self._on_complete = on_complete
        self.started = False
        self.done = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        self.started = True
        while not self.done:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnected
            body = message.get("body", b"")
            if not message.get("more_body", False):
                self.done = True
                self._on_complete()
            if body:
                yield body


def inspect_request(headers: RawHeaders) -> tuple[bool, str | None]:
    """Whether the request has a body, and why it must be refused (or None).

    Refused: more header bytes or fields than ``MAX_HEADER_BYTES`` and
    ``MAX_HEADER_COUNT`` (uvicorn's httptools parser sets no limit), and
    body framing that is unsafe to forward. ASGI servers reject most bad
    framing themselves; checking again costs nothing extra in this same
    pass and closes the door on smuggling through a lenient server.
    """
    length = None
    chunked = conflict = False
    size = 0
    for name, value in headers:
        size += len(name) + len(value)
        if name == b"content-length":
            conflict = conflict or (length is not None and value != length)
            length = value
        elif name == b"transfer-encoding":
            chunked = True
    if size > MAX_HEADER_BYTES or len(headers) > MAX_HEADER_COUNT:
        return False, HEADERS_TOO_LARGE
    if chunked and length is not None:
        return True, "both Content-Length and Transfer-Encoding"
    if length is not None and (conflict or not length.isdigit()):
        return True, "invalid Content-Length"
    return chunked or (length is not None and length.strip(b"0") != b""), None


class AsyncEngine:
    """Proxies routed requests of one event loop through one transport."""

    def __init__(self, balancer: Balancer) -> None:
        self.balancer = balancer
        self.loop = asyncio.get_running_loop()
        self.transport = make_async_transport(balancer.config.transport)
        self._ws_transport: Any = None
        self._started = False
        self._young: dict[_Exchange, None] = {}
        self._old: dict[_Exchange, None] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self.access_log = balancer.config.access_log

    def watch_later(self, exchange: _Exchange) -> None:
        """Have ``exchange`` watched for a client disconnect if it lasts."""
        self._young[exchange] = None
        if self._sweeper is None:
            self._sweeper = self.loop.create_task(self._sweep())

    def unwatch(self, exchange: _Exchange) -> None:
        self._young.pop(exchange, None)
        self._old.pop(exchange, None)

    async def _sweep(self) -> None:
        # Two generations: an exchange still running after one to two
        # periods gets its watcher. The task ends when nothing is waiting.
        while self._young or self._old:
            await asyncio.sleep(DISCONNECT_WATCH_DELAY)
            for exchange in self._old:
                exchange.start_watcher()
            self._old, self._young = self._young, {}
        self._sweeper = None

    async def aclose(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        await self.transport.aclose()
        if self._ws_transport is not None:
            await self._ws_transport.aclose()

    async def handle(
        self, route: Route, path: str, raw_path: str, scope: Scope, receive: Receive, send: Send
    ) -> None:
        """Proxy one request matched by ``route``; ``raw_path`` is normalised."""
        if not self._started:
            # No lifespan from the server: start the health checks now.
            self._started = True
            await self.balancer.astart()
        pool = self.balancer.pools[route.pool]
        if scope["type"] == "websocket":
            from ._websocket import proxy_websocket

            if self._ws_transport is None:
                from ._transports.aiohttp import AiohttpTransport

                self._ws_transport = AiohttpTransport()
            await proxy_websocket(self, pool, route, path, raw_path, scope, receive, send)
            return
        has_body, problem = inspect_request(scope["headers"])
        if problem is not None:
            status = 431 if problem is HEADERS_TOO_LARGE else 400
            await _respond(send, *bad_request(f"refused: {problem}", status=status))
            return
        exchange = _Exchange(self, pool, route, path, raw_path, scope, receive, send, has_body)
        await exchange.run()

    def request_info(self, path: str, scope: Scope) -> RequestInfo:
        client = scope.get("client")
        scheme: str = scope.get("scheme") or "http"
        return RequestInfo(
            scope.get("method", "GET"),
            path,
            query=scope.get("query_string", b"").decode("latin-1"),
            headers=scope["headers"],
            client_ip=client[0] if client else "",
            scheme=_WS_SCHEMES.get(scheme, scheme),
        )

    def upstream_headers(self, pool: Pool, request: RequestInfo) -> RawHeaders:
        return upstream_request_headers(
            request.raw_headers,
            client_ip=request.client_ip or "unknown",
            scheme=request.scheme,
            trusted=request.client_ip in self.balancer.trusted_proxies,
            host=None if pool.config.preserve_host else b"",
        )


def with_host(headers: RawHeaders, backend: Backend, preserve_host: bool) -> RawHeaders:
    """``headers`` with the backend's Host in front (unless the client's is kept)."""
    if preserve_host:
        return headers
    return [(b"host", backend.host_header_raw), *headers[1:]]


async def _respond(
    send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes
) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class _Exchange:
    """One proxied HTTP request, with its retries. Lives for one request."""

    def __init__(
        self,
        engine: AsyncEngine,
        pool: Pool,
        route: Route,
        path: str,
        raw_path: str,
        scope: Scope,
        receive: Receive,
        send: Send,
        has_body: bool,
    ) -> None:
        self.engine = engine
        self.pool = pool
        self.scope = scope
        self.receive = receive
        self.send = send
        self.request = engine.request_info(path, scope)
        query = self.request.query
        self.target = route.upstream_path(raw_path) + (f"?{query}" if query else "")
        self.task = asyncio.current_task()
        self.watcher: asyncio.Task[None] | None = None
        self.disconnected = False
        self.finished = False
        self.response_started = False
        self.body = RequestBody(receive, self._watch_disconnect) if has_body else None

    # --- disconnect detection -------------------------------------------------------

    def _watch_disconnect(self) -> None:
        # Once the request body is read, receive() answers only when the
        # client goes away: that is when to cancel the upstream request.
        # Most exchanges end within milliseconds, so the engine's sweeper
        # starts a watching task only for those still running after a short
        # delay: a set insertion costs far less than a task per request.
        self.engine.watch_later(self)

    def start_watcher(self) -> None:
        if not self.finished:
            self.watcher = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                break
        if not self.finished and self.task is not None:
            self.disconnected = True
            self.task.cancel()

    # --- the exchange -------------------------------------------------------------

    async def run(self) -> None:
        if self.body is None:
            self._watch_disconnect()
        try:
            await self._run()
        except asyncio.CancelledError:
            if not self.disconnected or self.task is None:
                raise
            self.task.uncancel()  # the client left: nothing to answer, nobody to tell
        except ClientDisconnected:
            pass
        except Exception:  # the request boundary: a bug here must not kill the worker
            logger.exception("pool %s: unexpected error while proxying", self.pool.name)
            if self.response_started:
                raise  # the server drops the connection: the client sees it cut
            self.finished = True
            await _respond(
                self.send,
                *problem_response(
                    ProxyError("the balancer failed to proxy the request", pool=self.pool.name)
                ),
            )
        finally:
            self.finished = True
            self.engine.unwatch(self)
            if self.watcher is not None:
                self.watcher.cancel()

    async def _run(self) -> None:
        pool = self.pool
        method = self.request.method
        headers = self.engine.upstream_headers(pool, self.request)
        preserve_host = pool.config.preserve_host
        transport = self.engine.transport
        attempt = 0
        exclude: Backend | None = None
        in_budget = False
        try:
            while True:
                attempt += 1
                try:
                    backend = pool.acquire(self.request, exclude=exclude)
                except NoEligibleBackend as exc:
                    await self._problem(exc)
                    return
                started = time.perf_counter()
                try:
                    response = await transport.send(
                        backend,
                        method,
                        self.target,
                        with_host(headers, backend, preserve_host),
                        self.body,
                        pool.timeouts,
                        pool=pool.name,
                    )
                except ProxyError as exc:
                    pool.release(backend, ok=False, latency_ms=_ms_since(started))
                    if in_budget:
                        pool.release_retry()
                        in_budget = False
                    if self.disconnected_during_body(exc):
                        return
                    retry = may_retry(
                        exc,
                        method=method,
                        attempt=attempt,
                        attempts=pool.retries.attempts,
                        response_started=False,
                        body_replayable=self.body is None or not self.body.started,
                    )
                    if retry and pool.try_acquire_retry():
                        in_budget = True
                        exclude = backend
                        continue
                    await self._problem(exc)
                    return
                except BaseException:
                    # A client that left says nothing about the backend.
                    pool.release(backend, ok=self.disconnected, latency_ms=None)
                    raise
                if not 200 <= response.status <= 599:
                    # 1xx (an unasked-for 101 included) or out of range: not
                    # an answer a client can be given.
                    await response.aclose()
                    pool.release(backend, ok=False, latency_ms=_ms_since(started))
                    await self._problem(
                        UpstreamProtocolError("upstream sent a malformed response", pool=pool.name)
                    )
                    return
                await self._relay(backend, response, started)
                return
        finally:
            if in_budget:
                pool.release_retry()

    def disconnected_during_body(self, exc: ProxyError) -> bool:
        # aiohttp reports our body iterator's ClientDisconnected as its own error
        cause = exc.__cause__
        while cause is not None:
            if isinstance(cause, ClientDisconnected):
                return True
            cause = cause.__cause__
        return False

    async def _relay(self, backend: Backend, response: UpstreamResponse, started: float) -> None:
        """Stream the upstream response to the client, settling the counters
        before the client sees the end, so status never lags what it saw."""
        pool = self.pool
        released = False
        try:
            status = response.status
            self.response_started = True  # from here on, never a second start
            await self.send(
                {
                    "type": "http.response.start",
                    "status": status,
                    "headers": downstream_response_headers(response.headers),
                }
            )
            send = self.send
            read = response.read
            while chunk := await read():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            self.finished = True
            latency = _ms_since(started)
            released = True
            pool.release(backend, ok=not is_failure(status), latency_ms=latency)
            await response.aclose()
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            if self.engine.access_log:
                self._log(backend, status, latency)
        except ProxyError:
            # Response bytes already reached the client: too late for a 502.
            # Ending without completing the response makes the server drop
            # the connection, so the client sees a truncated response.
            logger.warning("pool %s: upstream failed mid-response", pool.name)
        finally:
            if not released:  # the upstream failed, or the client left
                pool.release(backend, ok=self.disconnected, latency_ms=None)
                await response.aclose()

    async def _problem(self, error: ProxyError) -> None:
        logger.warning("pool %s: %s", self.pool.name, error.detail)
        if self.engine.access_log:
            self._log(None, error.status_code, None)
        self.finished = True
        await _respond(self.send, *problem_response(error))

    def _log(self, backend: Backend | None, status: int, latency: float | None) -> None:
        request = self.request
        access_logger.info(
            '%s "%s %s" %d pool=%s backend=%s %.1fms',
            request.client_ip or "-",
            request.method,
            self.target,
            status,
            self.pool.name,
            backend.url if backend else "-",
            latency or 0.0,
        )


def _ms_since(started: float) -> float:
    return (time.perf_counter() - started) * 1000.0


__all__ = ["AsyncEngine", "ClientDisconnected", "RequestBody"]
