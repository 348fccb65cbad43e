"""What both proxy engines do the same way, with no I/O of their own.

An engine turns a routed request into :class:`Attempts` and drives it: ask
for a backend, report how the try went, and let it decide whether to try
again. Counters, the retry budget and every verdict live here, so the async
(ASGI) and sync (WSGI) engines differ only in how they move bytes.
"""

from __future__ import annotations

import math
import random
import time
from functools import partial
from typing import TYPE_CHECKING, Any

from ._access import flag_for
from ._decision import IDEMPOTENT_METHODS, may_retry
from ._exceptions import NoEligibleBackend, UpstreamTimeout

if TYPE_CHECKING:
    from collections.abc import Callable

    from ._backend import Backend
    from ._config import RetriesConfig, TimeoutsConfig
    from ._exceptions import ProxyError
    from ._pool import Pool, Waiter
    from ._request import RequestInfo
    from ._tracing import Tracing
    from ._types import RawHeaders

#: Limits on a routed request's header block, as Envoy's defaults
#: (max_request_headers_kb = 60, max_headers_count = 100).
MAX_HEADER_BYTES = 60 * 1024
MAX_HEADER_COUNT = 100
HEADERS_TOO_LARGE = "request headers too large"


def inspect_request(headers: RawHeaders, http_version: str = "1.1") -> tuple[bool, str | None]:
    """Whether the request has a body, and why it must be refused (or None).

    Refused: more header bytes or fields than ``MAX_HEADER_BYTES`` and
    ``MAX_HEADER_COUNT`` (uvicorn's httptools parser sets no limit); a
    request that names no single host, that is two Host fields or none in
    HTTP/1.1 (RFC 9112 section 3.2); and body framing that is unsafe to
    forward: Content-Length with Transfer-Encoding, a Content-Length that
    is not one number, Transfer-Encoding from an HTTP/1.0 client (section
    6.1: faulty framing). Servers reject most of this themselves; checking
    again costs nothing extra in this same pass and closes the door on
    smuggling through a lenient server. ``http_version`` is the request's,
    as ASGI's ``http_version`` gives it.
    """
    length = None
    chunked = conflict = False
    size = hosts = 0
    for name, value in headers:
        size += len(name) + len(value)
        if name == b"host":
            # A WSGI server joins repeated fields with commas; no host has one.
            hosts += 2 if b"," in value else 1
        elif name == b"content-length":
            value = value.strip(b" \t")  # OWS is not part of the value (RFC 9110 5.5)
            conflict = conflict or (length is not None and value != length)
            length = value
        elif name == b"transfer-encoding":
            chunked = True
    if size > MAX_HEADER_BYTES or len(headers) > MAX_HEADER_COUNT:
        return False, HEADERS_TOO_LARGE
    if hosts > 1:
        return False, "more than one Host"
    if not hosts and http_version == "1.1":  # HTTP/2 and /3 may name it :authority
        return False, "no Host"
    if chunked and length is not None:
        return True, "both Content-Length and Transfer-Encoding"
    if chunked and http_version == "1.0":
        return True, "Transfer-Encoding in an HTTP/1.0 request"
    if length is not None and (conflict or not length.isdigit()):
        return True, "invalid Content-Length"
    return chunked or (length is not None and length.strip(b"0") != b""), None


def refusal_status(problem: str) -> int:
    """The status for a request :func:`inspect_request` refused."""
    return 431 if problem is HEADERS_TOO_LARGE else 400


class RequestBodyBase:
    """What both engines' request bodies keep: the part read ahead (the
    pool's ``request_buffer``) and whether the body can still go to another
    backend on a retry (``replayable``): none of it consumed yet, or all of
    it buffered. Each engine's subclass reads its server's input."""

    __slots__ = ("_buffered", "started", "whole")

    def __init__(self) -> None:
        self._buffered: list[bytes] = []
        self.started = False
        self.whole = False  # read into _buffered to its end

    @property
    def replayable(self) -> bool:
        return self.whole or not self.started


class ClientDisconnected(Exception):
    """The client went away (or sent less than it announced) while its
    request body was being read: it says nothing of the backend."""


def caused_by_client(error: BaseException) -> bool:
    """Whether ``error`` (a transport's, raised while it sent the body) comes
    from the client leaving: a :class:`ClientDisconnected` anywhere in its
    chain, as its cause or as the exception it was raised while handling
    (the libraries wrap our body iterator's exception either way)."""
    seen: set[int] = set()
    cause = error.__cause__ or error.__context__
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, ClientDisconnected):
            return True
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return False


def with_host(headers: RawHeaders, backend: Backend, preserve_host: bool) -> RawHeaders:
    """``headers`` with the backend's Host in front (unless the client's is kept).

    The forwarded headers always start with Host (see
    ``upstream_request_headers``), so it is replaced without a search.
    """
    if preserve_host:
        return headers
    return [(b"host", backend.host_header_raw), *headers[1:]]


def valid_status(status: int) -> bool:
    """Whether an upstream status can be given to a client: not 1xx (an
    unasked-for 101 included), nothing out of range."""
    return 200 <= status <= 599


class Attempts:
    """The tries of one request on one pool.

    ``next()`` picks a backend (the pinned one first, when it is fit; never
    one already tried while another is eligible; raising
    ``NoEligibleBackend``) and starts the clock; ``release()`` gives it back
    with the outcome; ``retry()`` and ``retry_status()`` say whether a
    failed try, or an answer whose status is in ``on_status``, may be
    repeated on another backend, taking a place in the pool's retry budget
    if so; ``backoff()`` is how long to wait before that retry, and
    ``remaining()`` what is left of ``timeouts.total``. ``close()`` settles
    whatever is still held, on every way out, so no counter is ever left
    behind. ``flags`` collects the access log's reason flags on the way
    (see :mod:`balancekit._access`), ``latency_ms`` the last try's time.
    """

    __slots__ = (
        "attempt",
        "backend",
        "deadline",
        "flags",
        "hedge",
        "in_budget",
        "latency_ms",
        "pinned",
        "pool",
        "request",
        "reserved",
        "retries",
        "span",
        "started",
        "target",
        "timeouts",
        "tracing",
        "tried",
    )

    def __init__(
        self,
        pool: Pool,
        request: RequestInfo,
        pinned: Backend | None = None,
        *,
        timeouts: TimeoutsConfig | None = None,
        retries: RetriesConfig | None = None,
        tracing: Tracing | None = None,
        target: str = "",
    ) -> None:
        self.pool = pool
        self.request = request
        #: The backend the request's session is pinned to (persistence), if any.
        self.pinned = pinned
        self.timeouts = timeouts if timeouts is not None else pool.timeouts
        self.retries = retries if retries is not None else pool.retries
        self.attempt = 0
        self.backend: Backend | None = None
        #: Backends this request has tried, skipped while another is eligible
        #: (Envoy's previous_hosts).
        self.tried: list[Backend] = []
        self.in_budget = False  # the current try holds a place in the budget
        self.reserved = False  # the next try does
        self.started = 0.0
        self.flags: list[str] = []
        self.latency_ms: float | None = None
        #: With ``tracing = true``: the current try's span, begun by next().
        self.tracing = tracing
        self.target = target
        self.span: Any = None
        total = self.timeouts.total
        #: ``time.monotonic()`` by which the response head must have come.
        self.deadline = time.monotonic() + total if total else 0.0
        #: The pool's ``hedge`` terms, for a request that may be sent twice.
        hedge = pool.config.hedge
        self.hedge = hedge if hedge is not None and request.method in IDEMPOTENT_METHODS else None

    def next(self) -> Backend:
        self.attempt += 1
        # The pin holds for the first try; a retry goes elsewhere, and the
        # response then moves the pin.
        prefer = self.pinned if self.attempt == 1 else None
        return self._began(self.pool.acquire(self.request, exclude=self.tried, prefer=prefer))

    def _began(self, backend: Backend) -> Backend:
        self.backend = backend
        self.tried.append(backend)
        if self.reserved:
            self.pool.retry_began()
            self.in_budget, self.reserved = True, False
        metrics = self.pool.metrics
        if metrics is not None:
            metrics.acquired(backend)
        if self.tracing is not None:
            self.span = self.tracing.start(
                self.request, self.pool.name, backend, self.target, self.attempt
            )
        self.started = time.perf_counter()
        return backend

    # --- the pool's queue: after next() raised NoEligibleBackend ------------------

    def enqueue(self, full: NoEligibleBackend, notify: Callable[[], None]) -> Waiter:
        """A place in the pool's queue, when ``full`` (what :meth:`next`
        raised) says every eligible backend is at ``max_connections`` and the
        pool has a queue; otherwise ``full`` is raised again. ``notify`` is
        called, from any thread, once a backend has been handed over."""
        if not full.full or not self.pool.max_pending:
            raise full
        return self.pool.enqueue(self.request, self.tried, notify)

    def queue_wait(self) -> float:
        """How long a request may wait in the queue: ``queue_timeout``, less
        if ``timeouts.total`` ends first."""
        return min(self.pool.queue_timeout, self.remaining())

    def dequeue(self, waiter: Waiter) -> Backend:
        """The wait is over: the backend handed over, now this try's. Raises
        :class:`NoEligibleBackend` (503) when none came within
        ``queue_timeout``, or the 504 of ``timeouts.total`` if that ran out
        first."""
        backend = self.pool.leave(waiter, keep=True)
        if backend is not None:
            return self._began(backend)
        if self.deadline and self.remaining() <= 0:
            raise deadline_passed(self.pool.name)
        error = NoEligibleBackend(
            f"no backend of pool {self.pool.name!r} came free within queue_timeout",
            pool=self.pool.name,
        )
        error.full = True  # overflow: backends were eligible, only busy
        raise error

    def abandon(self, waiter: Waiter) -> None:
        """The client left while queued: its place, or a backend handed over
        in the meantime, goes to the next in line."""
        self.pool.leave(waiter, keep=False)

    def release(
        self, *, ok: bool, timed: bool = True, code: int = 502, at_least: bool = False
    ) -> float | None:
        """Give the current backend back; its latency in ms when ``timed``.

        ``timed`` is False when the try ended for a reason that says nothing
        of the backend's speed (the client left); ``at_least`` when it was
        cancelled unanswered (a hedge's loser), so its time so far is only a
        lower bound of the backend's (``Pool.release``). ``code`` is the
        status the try ended with, for the metrics. Releasing twice is a no-op.
        """
        backend = self.backend
        if backend is None:
            return None
        self.backend = None
        if self.span is not None:  # the client left, or the answer was unusable
            self._end_span(None, None)
        latency = (time.perf_counter() - self.started) * 1000.0 if timed else None
        answer = None if at_least else latency  # the time of an answer, if any
        self.latency_ms = answer
        pool = self.pool
        if self.in_budget:
            # The budget's place first: the other way round, a request
            # asking in between (another thread) would find this one still
            # in the budget but no longer among the active requests it is
            # measured against, and be refused a retry it had room for.
            pool.release_retry()
            self.in_budget = False
        pool.release(backend, ok=ok, latency_ms=latency, at_least=at_least)
        if pool.metrics is not None:
            pool.metrics.released(backend, code, None if answer is None else answer / 1000)
        return latency

    def answered(self, status: int) -> float | None:
        """The upstream's response ended: release with its verdict (the
        pool's ``failure_statuses`` say which statuses count as failures)."""
        if self.span is not None:
            self._end_span(status, None)
        return self.release(ok=status not in self.pool.failure_statuses, code=status)

    def failed(self, error: ProxyError) -> None:
        """The current try failed with ``error``: release it as a failure."""
        if self.span is not None:
            self._end_span(None, type(error).__name__)
        self.release(ok=False, code=error.status_code)
        self.note(error)

    def _end_span(self, status: int | None, error: str | None) -> None:
        span, self.span = self.span, None
        assert self.tracing is not None  # a span was begun by it
        self.tracing.end(span, status, error)

    def note(self, error: ProxyError) -> None:
        """Keep ``error``'s reason flag for the access log (and count an
        answer for want of a backend in the metrics)."""
        flag = flag_for(error)
        if flag not in self.flags:
            self.flags.append(flag)
        if flag in ("UH", "UO") and self.pool.metrics is not None:
            self.pool.metrics.no_backend()

    def retry(self, error: ProxyError, *, body_replayable: bool) -> bool:
        """After a released failed try: whether to try another backend."""
        allowed = partial(
            may_retry,
            error,
            method=self.request.method,
            attempt=self.attempt,
            response_started=False,
            body_replayable=body_replayable,
        )
        if not allowed(attempts=self.retries.attempts):
            if allowed(attempts=self.attempt + 1):  # only the limit said no
                self._exhausted()
            return False
        return self._reserve()

    def _exhausted(self) -> None:
        # With ``attempts = 1`` there were no retries to run out of.
        if self.retries.attempts > 1 and "URX" not in self.flags:
            self.flags.append("URX")

    def retry_status(self, status: int, *, body_replayable: bool) -> bool:
        """An answer's head has come: whether to drop it and try another
        backend instead, because its status is in ``on_status`` (only for
        an idempotent request whose body can be sent again)."""
        retries = self.retries
        if (
            status not in retries.on_status
            or not body_replayable
            or self.request.method not in IDEMPOTENT_METHODS
            or (self.deadline and self.remaining() <= 0)
        ):
            return False
        if self.attempt >= retries.attempts:
            self._exhausted()
            return False
        if not self._reserve():
            return False
        if "RS" not in self.flags:
            self.flags.append("RS")
        return True

    def _reserve(self) -> bool:
        pool = self.pool
        if not pool.try_acquire_retry(self.retries.budget_percent, asking=self.backend is None):
            self._exhausted()  # the budget is spent
            return False
        self.reserved = True
        if pool.metrics is not None:
            pool.metrics.retried()
        return True

    def backoff(self) -> float:
        """Seconds to wait before the retry just granted: full jitter, a
        random time in ``[0, min(max_backoff, backoff x 2^(n-1))]`` before
        the n-th retry, never past the deadline."""
        retries = self.retries
        cap = min(retries.max_backoff, retries.backoff * 2 ** (self.attempt - 1))
        wait = random.uniform(0.0, cap) if cap > 0 else 0.0
        if self.deadline:
            wait = max(0.0, min(wait, self.remaining()))
        return wait

    def remaining(self) -> float:
        """Seconds left before ``timeouts.total`` passes (``inf`` with none)."""
        if not self.deadline:
            return math.inf
        return self.deadline - time.monotonic()

    def try_timeouts(self) -> TimeoutsConfig | None:
        """The timeouts for the next try: the route's or pool's, each cut to
        what is left of ``total``; None once it has passed."""
        timeouts = self.timeouts
        if not self.deadline:
            return timeouts
        left = self.remaining()
        if left <= 0:
            return None
        if left >= max(timeouts.connect, timeouts.read, timeouts.write):
            return timeouts
        return timeouts.model_copy(
            update={
                "connect": min(timeouts.connect, left),
                "read": min(timeouts.read, left),
                "write": min(timeouts.write, left),
            }
        )

    # --- hedged tries (``hedge``): more than one backend at once ---------------------

    def hedge_next(self) -> Backend | None:
        """A backend for a hedged try beside the current one, holding a place
        in the retry budget; None when the budget is spent or no backend but
        those tried is eligible. :meth:`hedge_end` settles it."""
        pool = self.pool
        if not pool.try_acquire_retry(self.retries.budget_percent):
            return None
        try:
            backend = pool.acquire(self.request, exclude=self.tried)
        except NoEligibleBackend:
            pool.release_retry(began=False)
            return None
        pool.retry_began()
        if backend in self.tried:  # the only eligible one is racing already
            pool.release(backend, ok=True, latency_ms=None)
            pool.release_retry()
            return None
        self.tried.append(backend)
        metrics = pool.metrics
        if metrics is not None:
            metrics.acquired(backend)
            metrics.hedged()
        return backend

    def hedge_end(self, backend: Backend, *, ok: bool, latency_ms: float, code: int) -> None:
        """A hedged try is over without being the answer: it failed (``ok``
        False, its time and status counted), or it lost the race and was
        cancelled (no blame, 499 as for a client that left, and its time so
        far a lower bound of the backend's: ``Pool.release(at_least=)``).
        Its place in the retry budget goes back."""
        pool = self.pool
        pool.release(backend, ok=ok, latency_ms=latency_ms, at_least=ok)
        if pool.metrics is not None:
            pool.metrics.released(backend, code, None if ok else latency_ms / 1000)
        pool.release_retry()

    def hedge_won(self, backend: Backend, started: float) -> None:
        """The hedged try on ``backend`` answered first: it becomes the
        current try (its budget place goes back now: the race is over), and
        the first one, if still held, is released without blame."""
        self.release(ok=True, code=499, at_least=True)
        self.backend = backend
        self.started = started
        pool = self.pool
        pool.release_retry()
        if pool.metrics is not None:
            pool.metrics.hedge_won()

    def client_left(self) -> None:
        """The client went away: a backend still held is released without
        blame and without a latency sample, counted as 499 (as NGINX logs it)."""
        self.close(ok=True)

    def close(self, *, ok: bool = False) -> None:
        """Settle on the way out: a backend still held is released as ``ok``
        (the client left: 499, as NGINX logs it) or failed."""
        self.release(ok=ok, timed=False, code=499 if ok else 502)
        if self.in_budget:
            self.pool.release_retry()
            self.in_budget = False
        if self.reserved:
            self.pool.release_retry(began=False)
            self.reserved = False


def deadline_passed(pool: str) -> UpstreamTimeout:
    """The 504 for a request whose ``timeouts.total`` ran out."""
    return UpstreamTimeout("no response within the total timeout (timeouts.total)", pool=pool)
