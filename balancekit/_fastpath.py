"""The lean server's fast path: a proxied request moved by callbacks alone.

On the coroutine path, most of what a small proxied request costs
``balancekit serve`` is machinery around its bytes: a task, a chain of
coroutines (middleware, engine, exchange, transport), a future and a
timer for every wait, an ASGI message dict for every part of the answer.
For the common request none of it is needed, so here the lean server's
request callback, the decision core (:class:`~balancekit._engine_core.Attempts`)
and the upstream connection's parser callbacks hand bytes to each other
directly:

1. the server has parsed a request head and asks :meth:`FastPath.take`;
2. the request is classified as by every adapter; a routed one that
   qualifies (below) gets its ``Attempts`` and a backend, and when a
   kept-alive connection to that backend is waiting, the request head is
   written to it at once;
3. the upstream parser's callbacks (:class:`_FastExchange`) rewrite the
   response head, write it and the body to the client, pausing the
   upstream socket while the client's is full, and at the end settle the
   try, pool the connection and tell the server the response is complete.

It qualifies when the pool has no session persistence (its store may need
I/O), no ``hedge`` for the method, no ``timeouts.total``, no tracing span,
no ``on_status`` retries, and the request has no body and is not HEAD.
Everything else takes the coroutine path (:mod:`balancekit._engine_async`),
and so does an exchange begun here as soon as it must wait for something
the callbacks do not hold: there is no warm connection (connecting), or the
try failed before its response head (retries, back-off, the problem
answer). It is handed over with its ``Attempts`` as they stand
(:class:`~balancekit._engine_async.Taken`), so both paths decide with one
core and differ only in how bytes move.
"""

from __future__ import annotations

import logging
import time
from functools import partial
from typing import TYPE_CHECKING

from ._access import log_access
from ._classify import Routed
from ._decision import IDEMPOTENT_METHODS
from ._engine_async import Taken
from ._engine_core import Attempts, valid_status
from ._exceptions import NoEligibleBackend, ProxyError, UpstreamError, UpstreamProtocolError
from ._forwarding import (
    _PLAIN_CONNECTION,
    HOP_BY_HOP_HEADERS,
    SERVER_OWNED_HEADERS,
    downstream_response_headers,
)
from ._server import STATUS_LINES
from ._transports.httptools import HttptoolsTransport, _Stale, give_back

if TYPE_CHECKING:
    import asyncio
    import collections

    from ._backend import Backend
    from ._engine_async import AsyncEngine
    from ._server import _Connection, _Cycle
    from ._transports.httptools import _Connection as _Upstream
    from ._types import RawHeaders
    from .asgi import BalanceMiddleware

logger = logging.getLogger("balancekit")

#: Read timeouts from this many seconds up are checked by the lean server's
#: sweep, once a second (so up to a second late), not by a timer each.
SWEPT_READ_TIMEOUT = 2.0

#: Response fields never passed on: hop-by-hop, and those the server writes.
_RESPONSE_DROP = HOP_BY_HOP_HEADERS | SERVER_OWNED_HEADERS


class FastPath:
    """Takes the requests of one lean server that qualify (see the module)."""

    def __init__(self, app: BalanceMiddleware) -> None:
        self.app = app
        self.balancer = app.balancer
        #: Exchanges begun here; of them, responses completed here, and
        #: those the coroutine path finished (plain counts, for tests and
        #: benchmarks; the rest failed mid-response or lost their client).
        self.begun = 0
        self.answered = 0
        self.handed_over = 0

    def take(self, conn: _Connection, cycle: _Cycle) -> None:
        """Answer the request of ``cycle``: here, or with a task on the
        engine's coroutine path, or, when it is not to be proxied (the
        status page, no route...), with the middleware's answer to it."""
        scope = cycle.scope
        method = scope["method"]
        client = conn.client
        verdict = self.balancer.classify(
            method,
            scope["raw_path"].decode("latin-1"),
            scope["headers"],
            query=scope["query_string"].decode("latin-1"),
            client_ip=client[0] if client else "",
            scheme=conn.server.scheme,
            http_version=scope["http_version"],
        )
        if type(verdict) is not Routed:  # classified once: the middleware answers it
            conn.spawn(
                cycle, partial(self.app._not_proxied, verdict, scope, cycle.receive, cycle.send)
            )
            return
        engine = self.balancer.engine(conn.loop)
        transport = engine.transport
        pool = verdict.pool
        if (
            verdict.has_body
            or method == "HEAD"
            or cycle.expect_continue
            or pool.persistence is not None
            or verdict.tracing is not None
            or verdict.timeouts.total
            or verdict.retries.on_status
            or (pool.config.hedge is not None and method in IDEMPOTENT_METHODS)
            or not isinstance(transport, HttptoolsTransport)
        ):
            conn.spawn(cycle, partial(engine.handle, verdict, scope, cycle.receive, cycle.send))
            return
        attempts = Attempts(
            pool,
            verdict.request,
            None,
            timeouts=verdict.timeouts,
            retries=verdict.retries,
            target=verdict.target,
        )
        try:
            backend = attempts.next()
        except NoEligibleBackend:  # the queue, or the 503: nothing is held yet
            conn.spawn(cycle, partial(engine.handle, verdict, scope, cycle.receive, cycle.send))
            return
        self.begun += 1
        _FastExchange(self, conn, cycle, verdict, attempts, engine, transport).send(backend)


class _FastExchange:
    """One request on the fast path: the upstream connection's sink (see
    :class:`balancekit._transports.httptools.Sink`), from the request head
    written to the response's last byte."""

    __slots__ = (
        "attempts",
        "conn",
        "cycle",
        "engine",
        "fast",
        "finished",
        "last",
        "loop",
        "pending",
        "pooled",
        "routed",
        "sent",
        "started",
        "status",
        "timer",
        "transport",
        "upstream",
    )

    def __init__(
        self,
        fast: FastPath,
        conn: _Connection,
        cycle: _Cycle,
        routed: Routed,
        attempts: Attempts,
        engine: AsyncEngine,
        transport: HttptoolsTransport,
    ) -> None:
        self.fast = fast
        self.engine = engine
        self.conn = conn
        self.cycle = cycle
        self.routed = routed
        self.attempts = attempts
        self.transport = transport
        self.loop: asyncio.AbstractEventLoop = conn.loop
        self.upstream: _Upstream | None = None
        self.pooled: collections.deque[_Upstream] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.last = 0.0  # loop.time() of the last upstream event
        self.status = 0  # the response's, once its head came
        self.pending = b""  # the response head, sent with the first body bytes
        self.sent = 0
        self.finished = False
        self.started = time.perf_counter() if routed.access_log else 0.0
        cycle.fast = self

    def send(self, backend: Backend) -> None:
        """The request to ``backend``, on a warm connection, or the exchange
        handed over to connect one."""
        up, pooled = self.transport.warm(backend)
        routed = self.routed
        method = routed.request.method
        if (
            up is None
            or up.transport is None
            or up.closed
            or (method not in IDEMPOTENT_METHODS and up.dropped())
        ):
            if up is not None:
                up.close()  # found closed before the request went: no harm done
            self._hand_over(backend, None)
            return
        self.upstream, self.pooled = up, pooled
        up.start(self)
        up.transport.write(self._request_head(method, backend))
        self.last = self.loop.time()
        read = self.attempts.timeouts.read
        if read < SWEPT_READ_TIMEOUT:  # else the server's sweep calls check_read
            self.timer = self.loop.call_later(read, self._check_read)

    # --- the upstream connection's callbacks (Sink) ----------------------------------

    def on_head(self) -> None:
        up = self.upstream
        assert up is not None
        self.last = self.loop.time()
        status = up.status
        if not valid_status(status):
            up.sink = None
            up.close()
            self._fail_before_head(UpstreamProtocolError(), retry=False)
            return
        self.status = status
        self.cycle.started = True
        self.pending = self._response_head(status, up.headers)

    def on_body(self, body: bytes) -> None:
        self.last = self.loop.time()
        self.sent += len(body)
        data = b"%x\r\n%s\r\n" % (len(body), body) if self.cycle.chunked else body
        if self.pending:
            data, self.pending = self.pending + data, b""
        conn = self.conn
        if conn.transport is None or conn.closed:
            return  # connection_lost is on its way: client_left settles
        conn.transport.write(data)
        if conn.write_paused:
            up = self.upstream
            if up is not None and not up.reading_paused and up.transport is not None:
                up.reading_paused = True
                up.transport.pause_reading()

    def on_complete(self) -> None:
        up = self.upstream
        assert up is not None and self.pooled is not None
        up.sink = None
        self._stop_timer()
        self.finished = True
        cycle = self.cycle
        cycle.fast = None
        self.attempts.answered(self.status)
        out = self.pending + (b"0\r\n\r\n" if cycle.chunked else b"")
        conn = self.conn
        if out and conn.transport is not None and not conn.closed:
            conn.transport.write(out)
        give_back(up, self.pooled)
        self.fast.answered += 1
        if self.started:
            self._log(self.status, disconnected=False)
        cycle.response_done = True
        conn.response_complete(cycle)

    def on_error(self, error: BaseException) -> None:
        self._stop_timer()
        if self.finished:
            return
        if not self.status:
            if isinstance(error, _Stale):
                # A kept-alive connection the backend had closed, found
                # after the write: once more on a fresh one where that is
                # safe (as the coroutine path's transport does).
                if self.routed.request.method in IDEMPOTENT_METHODS:
                    self._hand_over(self.attempts.backend, None)
                    return
                error = UpstreamError.closed()
            self._fail_before_head(
                error if isinstance(error, ProxyError) else UpstreamError(), retry=True
            )
            return
        # Response bytes already reached the client: too late for a 502.
        # Closing the client's connection unfinished tells it the body is cut.
        self.finished = True
        self.cycle.fast = None
        pool = self.routed.pool
        self.attempts.note(error if isinstance(error, ProxyError) else UpstreamError())
        logger.warning("pool %s: upstream failed mid-response", pool.name)
        self.attempts.close()
        if self.started:
            self._log(self.status, disconnected=False)
        self.conn.close()

    # --- the client's side -------------------------------------------------------------

    def client_left(self) -> None:
        """The client's connection is gone (or refused): the upstream's is
        dropped, never pooled half-read, and the try settled without blame."""
        if self.finished:
            return
        self.finished = True
        self.cycle.fast = None
        self._stop_timer()
        up = self.upstream
        if up is not None:
            up.sink = None
            up.close()
        self.attempts.close(ok=True)
        if self.started:
            self._log(self.status or 499, disconnected=True)

    def resume(self) -> None:
        """The client's socket drained: read the upstream again."""
        up = self.upstream
        if up is not None and up.reading_paused and up.transport is not None and not up.closed:
            up.reading_paused = False
            up.transport.resume_reading()

    # --- helpers -----------------------------------------------------------------------

    def _request_head(self, method: str, backend: Backend) -> bytes:
        """The upstream request head in one pass: what ``with_host`` and
        the transport's ``_request_head`` make for a request with no body,
        without the list between them. The forwarded headers start with
        Host (``upstream_request_headers``), replaced by the backend's
        unless the client's is kept."""
        routed = self.routed
        target = (backend.base_path + routed.target).encode("latin-1")
        parts = [method.encode("ascii"), b" ", target, b" HTTP/1.1\r\n"]
        fields = iter(routed.headers)
        if not routed.pool.config.preserve_host:
            next(fields)
            parts += (b"host: ", backend.host_header_raw, b"\r\n")
        for name, value in fields:
            parts += (name, b": ", value, b"\r\n")
        parts.append(b"\r\n")
        return b"".join(parts)

    def _response_head(self, status: int, headers: RawHeaders) -> bytes:
        """The client's response head, in one pass over the upstream's
        fields (lower-case names): what ``downstream_response_headers`` and
        the server's ``_Cycle._head`` do, without the list between them.
        The rare head that needs more (a Connection field naming others, or
        Content-Length beside Transfer-Encoding) goes their way."""
        cycle = self.cycle
        request_id = self.routed.request_id
        own = request_id[0] if request_id is not None else None
        parts = [STATUS_LINES.get(status) or b"HTTP/1.1 %d \r\n" % status]
        parts.append(self.conn.server.clock.date())
        length = chunked = False
        for name, value in headers:
            if name in _RESPONSE_DROP:
                if name == b"transfer-encoding":
                    chunked = True
                elif name == b"connection" and value.lower() not in _PLAIN_CONNECTION:
                    return cycle._head(status, downstream_response_headers(headers, request_id))
            elif name != own:
                if name == b"content-length":
                    length = True
                parts += (name, b": ", value, b"\r\n")
        if chunked and length:
            return cycle._head(status, downstream_response_headers(headers, request_id))
        if request_id is not None:
            parts += (request_id[0], b": ", request_id[1], b"\r\n")
        return cycle.end_head(parts, status, length)

    def check_read(self) -> None:
        """Fail the try if the upstream has been silent for the read
        timeout. The lean server's once-a-second sweep calls it for a
        timeout of ``SWEPT_READ_TIMEOUT`` or more (a minute by default):
        a timer per request would cost more than the rest of its waiting.
        A client that reads slowly (the upstream paused) is not the
        upstream's fault."""
        up = self.upstream
        if self.finished or up is None or up.reading_paused:
            return
        if self.loop.time() - self.last >= self.attempts.timeouts.read:
            up.timed_out()  # fails the connection: on_error follows

    def _check_read(self) -> None:
        # A short read timeout's own timer: checks, and comes again.
        self.timer = None
        self.check_read()
        if not self.finished:
            when = max(self.last + self.attempts.timeouts.read, self.loop.time() + 0.001)
            self.timer = self.loop.call_at(when, self._check_read)

    def _stop_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _fail_before_head(self, error: ProxyError, *, retry: bool) -> None:
        """The try failed before a response head: the coroutine path takes
        the rest (retry and back-off, or the problem answer)."""
        if retry:
            self._hand_over(None, error)
            return
        # An answer that cannot be passed on is not retried (as on the
        # coroutine path): settled here, the problem answered there.
        error.pool = self.routed.pool.name
        self.attempts.failed(error)
        self._hand_over(None, error, settled=True)

    def _hand_over(
        self, backend: Backend | None, failure: ProxyError | None, *, settled: bool = False
    ) -> None:
        self.finished = True
        self._stop_timer()
        cycle = self.cycle
        cycle.fast = None
        self.fast.handed_over += 1
        taken = Taken(self.attempts, backend, failure, self.started, settled=settled)
        work = partial(self.engine.take_over, self.routed, cycle.receive, cycle.send, taken)
        self.conn.spawn(cycle, work)

    def _log(self, status: int, *, disconnected: bool) -> None:
        log_access(
            self.routed,
            status,
            self.attempts,
            started=self.started,
            sent=self.sent,
            disconnected=disconnected,
        )


__all__ = ["FastPath"]
