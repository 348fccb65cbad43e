"""What both proxy engines do the same way, with no I/O of their own.

An engine turns a routed request into :class:`Attempts` and drives it: ask
for a backend, report how the try went, and let it decide whether to try
again. Counters, the retry budget and every verdict live here, so the async
(ASGI) and sync (WSGI) engines differ only in how they move bytes.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from ._decision import is_failure, may_retry

if TYPE_CHECKING:
    from ._backend import Backend
    from ._exceptions import ProxyError
    from ._pool import Pool
    from ._request import RequestInfo
    from ._types import RawHeaders

access_logger = logging.getLogger("balancekit.access")

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

    ``next()`` picks a backend (the pinned one first, when it is fit;
    raising ``NoEligibleBackend``) and starts
    the clock; ``release()`` gives it back with the outcome; ``retry()``
    says whether a failed try may be repeated on another backend, taking
    a place in the pool's retry budget if so. ``close()`` settles whatever
    is still held, on every way out, so no counter is ever left behind.
    """

    __slots__ = (
        "attempt",
        "backend",
        "exclude",
        "in_budget",
        "pinned",
        "pool",
        "request",
        "started",
    )

    def __init__(self, pool: Pool, request: RequestInfo, pinned: Backend | None = None) -> None:
        self.pool = pool
        self.request = request
        #: The backend the request's session is pinned to (persistence), if any.
        self.pinned = pinned
        self.attempt = 0
        self.backend: Backend | None = None
        self.exclude: Backend | None = None
        self.in_budget = False
        self.started = 0.0

    def next(self) -> Backend:
        self.attempt += 1
        # The pin holds for the first try; a retry goes elsewhere, and the
        # response then moves the pin.
        prefer = self.pinned if self.attempt == 1 else None
        pool = self.pool
        backend = self.backend = pool.acquire(self.request, exclude=self.exclude, prefer=prefer)
        if pool.metrics is not None:
            pool.metrics.acquired(backend)
        self.started = time.perf_counter()
        return backend

    def release(self, *, ok: bool, timed: bool = True, code: int = 502) -> float | None:
        """Give the current backend back; its latency in ms when ``timed``.

        ``timed`` is False when the try ended for a reason that says nothing
        of the backend's speed (the client left). ``code`` is the status the
        try ended with, for the metrics. Releasing twice is a no-op.
        """
        backend = self.backend
        if backend is None:
            return None
        self.backend = None
        latency = (time.perf_counter() - self.started) * 1000.0 if timed else None
        pool = self.pool
        pool.release(backend, ok=ok, latency_ms=latency)
        if pool.metrics is not None:
            pool.metrics.released(backend, code, None if latency is None else latency / 1000)
        if self.in_budget:
            self.pool.release_retry()
            self.in_budget = False
        self.exclude = backend
        return latency

    def answered(self, status: int) -> float | None:
        """The upstream's response ended: release with its verdict."""
        return self.release(ok=not is_failure(status), code=status)

    def retry(self, error: ProxyError, *, body_replayable: bool) -> bool:
        """After a released failed try: whether to try another backend."""
        pool = self.pool
        if not may_retry(
            error,
            method=self.request.method,
            attempt=self.attempt,
            attempts=pool.retries.attempts,
            response_started=False,
            body_replayable=body_replayable,
        ):
            return False
        if not pool.try_acquire_retry():
            return False
        self.in_budget = True
        if pool.metrics is not None:
            pool.metrics.retried()
        return True

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


def log_access(
    request: RequestInfo,
    target: str,
    pool: str,
    status: int,
    backend: Backend | None,
    latency: float | None,
) -> None:
    access_logger.info(
        '%s "%s %s" %d pool=%s backend=%s %.1fms',
        request.client_ip or "-",
        request.method,
        target,
        status,
        pool,
        backend.url if backend else "-",
        latency or 0.0,
    )
