"""The sync proxy engine: one routed WSGI request in, one upstream exchange out.

The twin of the async engine over the same decision core
(:mod:`balancekit._engine_core`): the request body is read from
``wsgi.input`` a chunk at a time as the upstream takes it, and the
response is a WSGI iterable that hands on each upstream chunk as it
arrives. The server's thread blocks on the upstream; nothing else does.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from ._access import log_access
from ._engine_core import (
    Attempts,
    ClientDisconnected,
    RequestBodyBase,
    caused_by_client,
    deadline_passed,
    valid_status,
    with_host,
)
from ._exceptions import NoEligibleBackend, ProxyError, UpstreamProtocolError
from ._forwarding import downstream_response_headers
from ._problem import error_problem, problem, status_line
from ._transports import make_sync_transport

if TYPE_CHECKING:
    from ._backend import Backend
    from ._classify import Routed
    from ._transports import SyncResponse
    from ._types import RawHeaders

logger = logging.getLogger("balancekit")

Environ = dict[str, Any]
StartResponse = Callable[..., Any]
WSGIResponse = Iterator[bytes] | list[bytes]

#: Bytes read from ``wsgi.input`` at once.
BODY_CHUNK = 64 * 1024


#: ``HTTP_X_FORWARDED_FOR`` -> ``b"x-forwarded-for"``, worked out once per name.
_HEADER_NAMES: dict[str, bytes] = {}
_CONTENT_HEADERS = (("CONTENT_TYPE", b"content-type"), ("CONTENT_LENGTH", b"content-length"))


def environ_headers(environ: Environ) -> RawHeaders:
    """The request's headers as raw pairs, in the order the server gave them."""
    headers: RawHeaders = []
    names = _HEADER_NAMES
    for key, value in environ.items():
        if key[:5] == "HTTP_":
            name = names.get(key)
            if name is None:
                name = key[5:].lower().replace("_", "-").encode("latin-1")
                if len(names) < 1024:
                    names[key] = name
            headers.append((name, value.encode("latin-1")))
    for key, name in _CONTENT_HEADERS:
        value = environ.get(key)
        if value:
            headers.append((name, value.encode("latin-1")))
    return headers


def http_version(environ: Environ) -> str:
    """``"1.1"`` for ``SERVER_PROTOCOL = "HTTP/1.1"``, as ASGI's http_version."""
    protocol: str = environ.get("SERVER_PROTOCOL", "HTTP/1.1")
    return protocol[5:] if protocol[:5] == "HTTP/" else protocol


def text_headers(headers: RawHeaders) -> list[tuple[str, str]]:
    return [(name.decode("latin-1"), value.decode("latin-1")) for name, value in headers]


class RequestBody(RequestBodyBase):
    """The client's body, read from ``wsgi.input`` as the upstream takes it.

    ``length`` is the Content-Length, or None for a chunked body that the
    server ends for us (``wsgi.input_terminated``). ``buffer(limit)`` reads
    up to ``limit`` bytes ahead before a backend is picked.
    """

    __slots__ = ("_input", "_left", "length")

    def __init__(self, stream: Any, length: int | None) -> None:
        super().__init__()
        self._input = stream
        self.length = length
        self._left = length  # None: read to the end the server gives

    def _read(self) -> bytes:
        """The next part of the body; b"" at its end."""
        left = self._left
        if left == 0:
            return b""
        try:
            chunk: bytes = self._input.read(BODY_CHUNK if left is None else min(BODY_CHUNK, left))
        except Exception as exc:  # each server has its own "client went away"
            raise ClientDisconnected(str(exc)) from exc
        if left is not None:
            if not chunk:
                raise ClientDisconnected(f"request body ended {left} bytes short")
            self._left = left - len(chunk)
        return chunk

    def buffer(self, limit: int) -> None:
        """Read the body ahead while it stays within ``limit`` bytes."""
        if self.length is not None and self.length > limit:
            return  # streams from its start, as it would unbuffered
        size = 0
        while size <= limit:
            chunk = self._read()
            if not chunk:
                self.whole = True
                return
            self._buffered.append(chunk)
            size += len(chunk)

    def __iter__(self) -> Iterator[bytes]:
        self.started = True
        if self.whole:  # kept for a retry
            yield from self._buffered
            return
        while self._buffered:
            yield self._buffered.pop(0)
        while chunk := self._read():
            yield chunk


class SyncEngine:
    """Proxies routed WSGI requests of one process through one transport.

    Safe to call from every thread of a threaded server; the balancer makes
    a new one in a forked child (a connection pool must not cross a fork).
    Like the async engine it knows nothing of the balancer: each request
    arrives as a :class:`~balancekit._classify.Routed`.
    """

    def __init__(self, transport: str) -> None:
        self.transport = make_sync_transport(transport)

    def close(self) -> None:
        self.transport.close()

    def handle(
        self, routed: Routed, environ: Environ, start_response: StartResponse
    ) -> WSGIResponse:
        """Proxy one routed request."""
        body = None
        if routed.has_body:
            length = environ.get("CONTENT_LENGTH")
            if length:
                body = RequestBody(environ["wsgi.input"], int(length))
            elif environ.get("wsgi.input_terminated"):
                body = RequestBody(environ["wsgi.input"], None)
            else:
                # A chunked body this server cannot end for us: as NGINX
                # without chunked support, ask for a length.
                detail = "a request body needs Content-Length here"
                return respond(start_response, *problem(411, detail, close=True))
        try:
            return self._proxy(routed, body, start_response)
        except ClientDisconnected:
            # Nobody reads this answer; the server needs one all the same.
            return respond(start_response, 400, [(b"connection", b"close")], b"")
        except Exception:  # the request boundary: a bug here must not kill the worker
            pool = routed.pool.name
            logger.exception("pool %s: unexpected error while proxying", pool)
            error = ProxyError(pool=pool)
            return respond(start_response, *error_problem(error))

    def _proxy(
        self, routed: Routed, body: RequestBody | None, start_response: StartResponse
    ) -> WSGIResponse:
        started = time.perf_counter() if routed.access_log else 0.0
        pool, request, target = routed.pool, routed.request, routed.target
        headers = routed.headers
        preserve_host = pool.config.preserve_host
        if body is not None and pool.config.request_buffer:
            body.buffer(pool.config.request_buffer)
        persistence = pool.persistence
        pinned = None if persistence is None else persistence.find(request, pool)
        attempts = Attempts(
            pool,
            request,
            pinned,
            timeouts=routed.timeouts,
            retries=routed.retries,
            tracing=routed.tracing,
            target=target,
        )
        relay = None
        try:
            while True:
                try:
                    backend = attempts.next()
                except NoEligibleBackend as full:
                    try:
                        backend = _queue(attempts, full)
                    except ProxyError as exc:  # no place, or none came free
                        return self._problem(exc, routed, start_response, attempts, started)
                try:
                    timeouts = attempts.try_timeouts()
                    if timeouts is None:
                        raise deadline_passed(pool.name)
                    sent_headers = with_host(headers, backend, preserve_host)
                    if attempts.span is not None:
                        assert attempts.tracing is not None
                        sent_headers = attempts.tracing.inject(attempts.span, sent_headers)
                    response = self.transport.send(
                        backend, request.method, target, sent_headers, body, timeouts
                    )
                except ClientDisconnected:
                    attempts.client_left()  # says nothing of the backend
                    _log_left(routed, attempts, started)
                    raise
                except ProxyError as exc:
                    exc.pool = pool.name  # the one place a transport's error meets its pool
                    if caused_by_client(exc):
                        attempts.client_left()
                        _log_left(routed, attempts, started)
                        raise ClientDisconnected from exc
                    attempts.failed(exc)
                    if attempts.retry(exc, body_replayable=body is None or body.replayable):
                        if _backoff(attempts):
                            continue
                        exc = deadline_passed(pool.name)
                    return self._problem(exc, routed, start_response, attempts, started)
                status = response.status
                if not valid_status(status):
                    response.close()
                    error = UpstreamProtocolError(pool=pool.name)
                    attempts.failed(error)
                    return self._problem(error, routed, start_response, attempts, started)
                if status in attempts.retries.on_status and attempts.retry_status(
                    status, body_replayable=body is None or body.replayable
                ):
                    attempts.answered(status)
                    response.close()
                    if _backoff(attempts):
                        continue
                    late = deadline_passed(pool.name)
                    return self._problem(late, routed, start_response, attempts, started)
                relay = Relay(attempts, response, routed, started)
                try:
                    response_headers = downstream_response_headers(
                        response.headers, routed.request_id
                    )
                    if persistence is not None and backend is not pinned:
                        response_headers += persistence.remember(request, backend, pool)
                    start_response(status_line(response.status), text_headers(response_headers))
                except BaseException:  # released, then raised again
                    relay.close()
                    raise
                return relay
        finally:
            if relay is None:  # else the relay settles them when the server is done
                attempts.close()

    def _problem(
        self,
        error: ProxyError,
        routed: Routed,
        start_response: StartResponse,
        attempts: Attempts,
        started: float,
    ) -> list[bytes]:
        logger.warning("pool %s: %s", routed.pool.name, error.detail)
        attempts.note(error)
        status, headers, body = error_problem(error)
        if routed.request_id is not None:
            headers.append(routed.request_id)
        if routed.access_log:
            log_access(
                routed, status, attempts, started=started, sent=len(body), disconnected=False
            )
        return respond(start_response, status, headers, body)


def _log_left(routed: Routed, attempts: Attempts, started: float) -> None:
    """The access log's line for a client that left before any answer."""
    if routed.access_log:
        log_access(routed, 499, attempts, started=started, sent=0, disconnected=True)


def _queue(attempts: Attempts, full: NoEligibleBackend) -> Backend:
    """Wait in the pool's queue for a backend (see ``Attempts.enqueue``).
    WSGI tells nothing of a client that leaves, so a queued request waits
    out its ``queue_timeout`` whatever the client does."""
    woken = threading.Event()
    waiter = attempts.enqueue(full, woken.set)
    if waiter.backend is None:
        woken.wait(max(0.0, attempts.queue_wait()))
    return attempts.dequeue(waiter)


def _backoff(attempts: Attempts) -> bool:
    """Wait before a granted retry; False if ``timeouts.total`` ran out."""
    wait = attempts.backoff()
    if wait > 0:
        time.sleep(wait)
    return attempts.remaining() > 0


def respond(
    start_response: StartResponse, status: int, headers: RawHeaders, body: bytes
) -> list[bytes]:
    start_response(status_line(status), text_headers(headers))
    return [body]


class Relay:
    """The WSGI response iterable: upstream chunks, handed on as they arrive.

    The counters are settled when the upstream body ends, before the server
    writes the last chunk, so status never lags what a client saw. A server
    that stops early (the client left) calls ``close()``, which settles
    them without blaming the backend and drops the upstream connection.
    The access log's line is written once, on whichever comes first.
    """

    __slots__ = ("_attempts", "_logged", "_read", "_response", "_routed", "_sent", "_started")

    def __init__(
        self, attempts: Attempts, response: SyncResponse, routed: Routed, started: float
    ) -> None:
        self._attempts = attempts
        self._response = response
        self._read = response.read
        self._routed = routed
        self._started = started
        self._sent = 0
        self._logged = not routed.access_log  # nothing to write: as if written

    def __iter__(self) -> Relay:
        return self

    def __next__(self) -> bytes:
        try:
            chunk = self._read()
        except ProxyError as exc:
            # Response bytes may have reached the client: too late for a 502.
            # Raising makes the server drop the connection, so the client
            # sees a truncated response rather than a complete-looking one.
            pool = self._attempts.pool.name
            logger.warning("pool %s: upstream failed mid-response", pool)
            self._attempts.close(ok=False)
            self._attempts.note(exc)
            self._log(disconnected=False)
            raise
        if chunk:
            self._sent += len(chunk)
            return chunk
        self._attempts.answered(self._response.status)
        self._response.close()  # the connection goes back to the pool at once
        self._log(disconnected=False)
        raise StopIteration

    def close(self) -> None:
        # Called by the server when it is done, early or not: a backend still
        # held here was left by the client, which says nothing of it.
        left = self._attempts.backend is not None
        self._attempts.client_left()
        self._response.close()
        self._log(disconnected=left)

    def _log(self, *, disconnected: bool) -> None:
        if self._logged:
            return
        self._logged = True
        log_access(
            self._routed,
            self._response.status,
            self._attempts,
            started=self._started,
            sent=self._sent,
            disconnected=disconnected,
        )
