"""The async proxy engine: one routed ASGI request in, one upstream exchange out.

Bodies stream both ways with back-pressure: the request body is read from
``receive`` only as fast as the upstream takes it, and each upstream chunk
is sent on before the next is read. Every decision (which backend, whether
to retry, which headers) is made by the I/O-free core; this module only
moves bytes and keeps the counters honest on every path out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
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
from ._problem import error_problem
from ._transports import make_async_transport

if TYPE_CHECKING:
    from ._backend import Backend
    from ._classify import Routed
    from ._config import TimeoutsConfig
    from ._transports import UpstreamResponse
    from ._types import RawHeaders, Receive, Scope, Send

logger = logging.getLogger("balancekit")

#: Seconds after the request body is read before client disconnects are
#: watched for; a disconnect is noticed at most this much later.
DISCONNECT_WATCH_DELAY = 0.05


class RequestBody(RequestBodyBase):
    """The client's body, pulled from ``receive`` as the upstream asks for it;
    ``buffer(limit)`` reads up to ``limit`` bytes ahead, before any backend
    is picked."""

    __slots__ = ("_on_complete", "_receive", "done")

    def __init__(self, receive: Receive, on_complete: Callable[[], None]) -> None:
        super().__init__()
        self._receive = receive
        self._on_complete = on_complete
        self.done = False

    async def _next(self) -> bytes:
        message = await self._receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected
        if not message.get("more_body", False):
            self.done = True
            self._on_complete()
        body: bytes = message.get("body", b"")
        return body

    async def buffer(self, limit: int) -> None:
        """Read the body ahead while it stays within ``limit`` bytes."""
        size = 0
        while not self.done and size <= limit:
            chunk = await self._next()
            if chunk:
                self._buffered.append(chunk)
                size += len(chunk)
        self.whole = self.done and size <= limit

    async def __aiter__(self) -> AsyncIterator[bytes]:
        self.started = True
        if self.whole:  # kept for a retry
            for chunk in self._buffered:
                yield chunk
            return
        while self._buffered:
            yield self._buffered.pop(0)
        while not self.done:
            chunk = await self._next()
            if chunk:
                yield chunk


class Taken:
    """An exchange the lean server's fast path began and hands over to the
    coroutine path (see ``balancekit._fastpath``): its ``attempts``, and
    either the ``backend`` picked for a try not yet sent (no warm
    connection to it; a kept-alive one found closed before the request
    went), or the ``failure`` of the try that was sent (``settled``: already
    released as failed, and not to be retried: only the problem is left to
    answer); ``started``, its arrival for the access log."""

    __slots__ = ("attempts", "backend", "failure", "settled", "started")

    def __init__(
        self,
        attempts: Attempts,
        backend: Backend | None,
        failure: ProxyError | None,
        started: float,
        *,
        settled: bool = False,
    ) -> None:
        self.attempts = attempts
        self.backend = backend
        self.failure = failure
        self.started = started
        self.settled = settled


class AsyncEngine:
    """Proxies routed requests of one event loop through one transport.

    It knows nothing of the balancer: each request arrives as a
    :class:`~balancekit._classify.Routed` that carries its pool and
    everything else worked out, and the engine moves its bytes.
    """

    def __init__(self, transport: str) -> None:
        self.loop = asyncio.get_running_loop()
        self.transport = make_async_transport(transport)
        self._ws_transport: Any = None
        self._young: dict[_Exchange, None] = {}
        self._old: dict[_Exchange, None] = {}
        self._sweeper: asyncio.Task[None] | None = None

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

    async def handle(self, routed: Routed, scope: Scope, receive: Receive, send: Send) -> None:
        """Proxy one routed request (an HTTP or a WebSocket scope)."""
        if scope["type"] == "websocket":
            from ._websocket import proxy_websocket

            if self._ws_transport is None:
                from ._transports.aiohttp import AiohttpTransport

                self._ws_transport = AiohttpTransport()
            await proxy_websocket(self._ws_transport, routed, scope, receive, send)
            return
        await _Exchange(self, routed, receive, send).run()

    async def take_over(self, routed: Routed, receive: Receive, send: Send, taken: Taken) -> None:
        """Go on with an exchange the fast path began (see :class:`Taken`)."""
        await _Exchange(self, routed, receive, send).run(taken)


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def _respond(
    send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes
) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


#: Closing answers that came to cancelled hedged tries (see _drop_answer).
_closing: set[asyncio.Task[None]] = set()


def _drop_answer(task: asyncio.Task[UpstreamResponse]) -> None:
    """A cancelled hedged try whose response head came just before the
    cancel: close it with its body unread, which drops its connection
    rather than pooling it half-read."""
    if task.cancelled() or task.exception() is not None:
        return
    closing = asyncio.get_running_loop().create_task(task.result().aclose())
    _closing.add(closing)
    closing.add_done_callback(_closing.discard)


class _Exchange:
    """One proxied HTTP request, with its retries. Lives for one request."""

    def __init__(self, engine: AsyncEngine, routed: Routed, receive: Receive, send: Send) -> None:
        self.engine = engine
        self.routed = routed
        self.pool = routed.pool
        self.receive = receive
        self.send = send
        self.request = routed.request
        self.target = routed.target
        self.task = asyncio.current_task()
        self.watcher: asyncio.Task[None] | None = None
        self.disconnected = False
        self.finished = False
        self.response_started = False
        self.body = RequestBody(receive, self._watch_disconnect) if routed.has_body else None
        # For the access log: what the client got, and when it came.
        self.started = time.perf_counter() if routed.access_log else 0.0
        self.status = 499  # until an answer starts: the client left first
        self.sent = 0
        self.attempts: Attempts | None = None

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

    async def run(self, taken: Taken | None = None) -> None:
        """Proxy the request; ``taken`` is what the lean server's fast path
        had done when it handed the exchange over (see ``Taken``)."""
        if taken is not None and taken.started:
            self.started = taken.started
        if self.body is None:
            self._watch_disconnect()
        try:
            await self._run(taken)
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
            error = ProxyError(pool=self.pool.name)
            self.status = error.status_code
            await _respond(self.send, *error_problem(error))
        finally:
            self.finished = True
            self.engine.unwatch(self)
            if self.watcher is not None:
                self.watcher.cancel()
            if self.routed.access_log:
                log_access(
                    self.routed,
                    self.status,
                    self.attempts,
                    started=self.started,
                    sent=self.sent,
                    disconnected=self.disconnected,
                )

    async def _run(self, taken: Taken | None) -> None:
        routed = self.routed
        pool = self.pool
        body = self.body
        backend: Backend | None = None
        failure: ProxyError | None = None
        if taken is not None:
            attempts = self.attempts = taken.attempts
            backend, failure = taken.backend, taken.failure
            if failure is not None and taken.settled:
                try:
                    await self._problem(failure)
                finally:
                    attempts.close(ok=self.disconnected)
                return
        else:
            if body is not None and pool.config.request_buffer:
                await body.buffer(pool.config.request_buffer)
            persistence = pool.persistence
            pinned = None if persistence is None else await persistence.afind(self.request, pool)
            attempts = self.attempts = Attempts(
                pool,
                self.request,
                pinned,
                timeouts=routed.timeouts,
                retries=routed.retries,
                tracing=routed.tracing,
                target=self.target,
            )
        try:
            if failure is not None:  # the fast path's try failed before a head
                if not await self._failed(attempts, failure):
                    return
                backend = None
            while True:
                if backend is None:
                    try:
                        backend = attempts.next()
                    except NoEligibleBackend as full:
                        try:
                            backend = await self._queue(attempts, full)
                        except ProxyError as exc:  # no place, or none came free
                            await self._problem(exc)
                            return
                try:
                    if attempts.deadline or attempts.span is not None or attempts.hedge:
                        response = await self._send_with_terms(attempts, backend)
                    else:  # the common case, without a coroutine of its own
                        response = await self.engine.transport.send(
                            backend,
                            self.request.method,
                            self.target,
                            with_host(routed.headers, backend, pool.config.preserve_host),
                            self.body,
                            attempts.timeouts,
                        )
                except ClientDisconnected:
                    self.disconnected = True  # says nothing of the backend
                    return
                except ProxyError as exc:
                    if caused_by_client(exc):
                        self.disconnected = True
                        return
                    if await self._failed(attempts, exc):
                        backend = None
                        continue
                    return
                status = response.status
                if not valid_status(status):
                    await response.aclose()
                    error = UpstreamProtocolError(pool=pool.name)
                    attempts.failed(error)
                    await self._problem(error)
                    return
                if status in attempts.retries.on_status and attempts.retry_status(
                    status, body_replayable=body is None or body.replayable
                ):
                    attempts.answered(status)
                    await response.aclose()
                    if await self._backoff(attempts):
                        backend = None
                        continue
                    await self._problem(deadline_passed(pool.name))
                    return
                await self._relay(attempts, backend, response)
                return
        finally:
            # A client that left (or a cancelled task) says nothing of the backend.
            attempts.close(ok=self.disconnected)

    async def _failed(self, attempts: Attempts, error: ProxyError) -> bool:
        """The current try failed before a response head: whether to try
        again (after the back-off); if not, the client has its problem."""
        error.pool = self.pool.name  # the one place a transport's error meets its pool
        attempts.failed(error)
        body = self.body
        if attempts.retry(error, body_replayable=body is None or body.replayable):
            if await self._backoff(attempts):
                return True
            error = deadline_passed(self.pool.name)
        await self._problem(error)
        return False

    async def _queue(self, attempts: Attempts, full: NoEligibleBackend) -> Backend:
        """Wait in the pool's queue for a backend (see ``Attempts.enqueue``).
        The disconnect watcher cancels the task when the client leaves,
        which gives the place up."""
        loop = self.engine.loop
        woken = loop.create_future()

        def notify() -> None:  # from whichever thread freed a place
            with contextlib.suppress(RuntimeError):  # the loop has closed
                loop.call_soon_threadsafe(_wake, woken)

        waiter = attempts.enqueue(full, notify)
        if waiter.backend is None:
            try:
                async with asyncio.timeout(attempts.queue_wait()):
                    await woken
            except TimeoutError:
                pass  # dequeue() says 503, or takes a backend handed over just now
            except asyncio.CancelledError:
                attempts.abandon(waiter)
                raise
        return attempts.dequeue(waiter)

    async def _send_with_terms(self, attempts: Attempts, backend: Backend) -> UpstreamResponse:
        """One try: the request to ``backend``, up to the response head,
        within what is left of ``timeouts.total``, with its span's context."""
        request = self.request
        headers = with_host(self.routed.headers, backend, self.pool.config.preserve_host)
        if attempts.span is not None:
            assert attempts.tracing is not None
            headers = attempts.tracing.inject(attempts.span, headers)
        send = self.engine.transport.send
        timeouts = attempts.try_timeouts()
        if timeouts is None:
            raise deadline_passed(self.pool.name)
        if attempts.hedge is not None and self.body is None:
            answer = self._race(attempts, backend, headers, timeouts)
        else:
            answer = send(backend, request.method, self.target, headers, self.body, timeouts)
        if not attempts.deadline:
            return await answer
        try:
            async with asyncio.timeout(attempts.remaining()):
                return await answer
        except TimeoutError:
            raise deadline_passed(self.pool.name) from None

    async def _race(
        self, attempts: Attempts, backend: Backend, headers: RawHeaders, timeouts: TimeoutsConfig
    ) -> UpstreamResponse:
        """The try on ``backend``, and after ``hedge.after`` seconds without a
        response head, up to ``hedge.max`` more on other backends (each in
        the retry budget): the first head wins, the others are cancelled and
        their connections closed, never pooled half-read. A try that fails
        while another still runs leaves the race to it."""
        hedge = attempts.hedge
        assert hedge is not None
        loop = asyncio.get_running_loop()
        send = self.engine.transport.send
        method, target, routed = self.request.method, self.target, self.routed
        #: Each try's task: its backend, and when it began (0.0: the first's,
        #: whose clock ``attempts`` keeps).
        racers: dict[asyncio.Task[UpstreamResponse], tuple[Backend, float]] = {
            loop.create_task(send(backend, method, target, headers, None, timeouts)): (backend, 0.0)
        }
        launched = 0
        try:
            while racers:
                timer = hedge.after if launched < hedge.max else None
                done, _ = await asyncio.wait(
                    racers, timeout=timer, return_when=asyncio.FIRST_COMPLETED
                )
                if not done:
                    extra = attempts.hedge_next()
                    if extra is None:
                        launched = hedge.max  # no budget or no backend: wait for those racing
                        continue
                    launched += 1
                    extra_headers = with_host(routed.headers, extra, self.pool.config.preserve_host)
                    task = loop.create_task(
                        send(extra, method, target, extra_headers, None, timeouts)
                    )
                    racers[task] = (extra, time.perf_counter())
                    continue
                for task in done:
                    racer, started = racers.pop(task)
                    error = task.exception()
                    if error is None:
                        if started:
                            attempts.hedge_won(racer, started)
                        return task.result()
                    code = error.status_code if isinstance(error, ProxyError) else 502
                    if started:  # a hedged try failed: settled here
                        latency = (time.perf_counter() - started) * 1000.0
                        attempts.hedge_end(racer, ok=False, latency_ms=latency, code=code)
                    if not isinstance(error, ProxyError) or not racers:
                        raise error  # the last one standing: the usual handling follows
                    error.pool = self.pool.name
                    if not started:
                        attempts.failed(error)  # the first try failed: the others race on
            raise AssertionError("a race ends with an answer or an error")  # pragma: no cover
        finally:
            # Whatever still races lost: cancelled now, settled without
            # blame. The first try, when it lost, was released by
            # hedge_won; when the race ended otherwise, Attempts.close does.
            for task, (racer, started) in racers.items():
                task.cancel()
                task.add_done_callback(_drop_answer)
                if started:
                    elapsed = (time.perf_counter() - started) * 1000.0
                    attempts.hedge_end(racer, ok=True, latency_ms=elapsed, code=499)

    async def _backoff(self, attempts: Attempts) -> bool:
        """Wait before a granted retry; False if ``timeouts.total`` ran out."""
        wait = attempts.backoff()
        if wait > 0:
            await asyncio.sleep(wait)
        return attempts.remaining() > 0

    async def _relay(
        self, attempts: Attempts, backend: Backend, response: UpstreamResponse
    ) -> None:
        """Stream the upstream response to the client, settling the counters
        before the client sees the end, so status never lags what it saw."""
        try:
            status = self.status = response.status
            headers = downstream_response_headers(response.headers, self.routed.request_id)
            persistence = self.pool.persistence
            if persistence is not None and backend is not attempts.pinned:
                headers += await persistence.aremember(self.request, backend, self.pool)
            self.response_started = True  # from here on, never a second start
            await self.send({"type": "http.response.start", "status": status, "headers": headers})
            send = self.send
            read = response.read
            sent = 0
            try:
                while chunk := await read():
                    sent += len(chunk)
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            finally:
                self.sent = sent
            self.finished = True
            attempts.answered(status)
            await response.aclose()
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except ProxyError as exc:
            # Response bytes already reached the client: too late for a 502.
            # Ending without completing the response makes the server drop
            # the connection, so the client sees a truncated response.
            attempts.note(exc)
            logger.warning("pool %s: upstream failed mid-response", self.pool.name)
        finally:
            if not self.finished:  # the upstream failed, or the client left
                await response.aclose()

    async def _problem(self, error: ProxyError) -> None:
        logger.warning("pool %s: %s", self.pool.name, error.detail)
        if self.attempts is not None:
            self.attempts.note(error)
        self.finished = True
        status, headers, body = error_problem(error)
        if self.routed.request_id is not None:
            headers.append(self.routed.request_id)
        self.status, self.sent = status, len(body)
        await _respond(self.send, status, headers, body)


__all__ = ["AsyncEngine", "RequestBody", "Taken"]
