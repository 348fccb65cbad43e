"""``LoadReportMiddleware``: the backend side of a Prequal probe.

A balancer running ``algorithm = "prequal"`` asks each backend how loaded
it is with ``GET /.well-known/balancekit/load`` and gets::

    {"in_flight": 3, "latency_ms": 12.5}

``in_flight`` is how many of the app's requests have started and not yet
finished (the probe itself is not one of them), ``latency_ms`` an
exponentially weighted moving average of their latency in milliseconds,
from the call of the app to the end of its response. It is ``0.0`` until
the first request has finished: a new backend looks idle and fast, which is
what it is, and the balancer always gets a number.

``LoadReportMiddleware(app)`` takes either kind of app and gives back the
matching form: an async callable (a coroutine function, or an object whose
``__call__`` is one) gets :class:`ASGILoadReportMiddleware`, anything else
:class:`WSGILoadReportMiddleware`. Django has its own,
``balancekit_django.middleware.LoadReportMiddleware``, over the same
:class:`LoadTracker`.

When a request stops counting:

- ASGI: once the body's last message (``more_body`` false, or a
  ``http.response.pathsend``) has been sent, so work the app does after its
  response (Starlette's background tasks) is not counted; or when the app
  raises or is cancelled before that. Websocket connections are not
  counted (they are long-lived and say nothing about the time a request
  takes); lifespan and websocket scopes pass straight through.
- WSGI: once the server has closed the response iterable (PEP 3333 has
  every server call ``close()``, also when the client went away); or when
  the app raises before returning one. Wrapping the iterable hides a
  ``wsgi.file_wrapper`` from the server, so file responses are sent by
  iteration rather than ``sendfile``.

A request that fails (the app raises, its response is cut off, or its
status is 5xx) still stops counting; its time moves the average only
upward, so a backend that fails fast, or sheds load with quick 503s, never
looks fast.

The cost is a few attribute updates per request: the ASGI form takes no
lock (one event loop runs it), the WSGI form one uncontended lock at the
start and one at the end (``bench/load_report_bench.py`` measures it).
"""

from __future__ import annotations

import asyncio
import inspect
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from time import perf_counter
from typing import Any, overload

from ._exceptions import ConfigError, Problem
from ._types import ASGIApp, Message, Receive, Scope, Send

__all__ = [
    "ASGILoadReportMiddleware",
    "DEFAULT_ALPHA",
    "DEFAULT_PATH",
    "LoadReportMiddleware",
    "LoadTracker",
    "WSGILoadReportMiddleware",
]

#: Where the probe is answered: the default ``probe_path`` of ``prequal``.
DEFAULT_PATH = "/.well-known/balancekit/load"
#: The weight of the newest latency sample in the average: about the last
#: ten requests make most of it (a sample's weight halves every 6.6 more).
DEFAULT_ALPHA = 0.1

_Environ = dict[str, Any]
_StartResponse = Callable[..., Any]
_WSGIApp = Callable[[_Environ, _StartResponse], Iterable[bytes]]
_Answer = tuple[int, list[tuple[bytes, bytes]], bytes]

_JSON_HEADERS = [(b"content-type", b"application/json"), (b"cache-control", b"no-store")]
_NOT_ALLOWED = b"405 Method Not Allowed: the load report answers GET and HEAD\n"
_NOT_ALLOWED_HEADERS = [
    (b"allow", b"GET, HEAD"),
    (b"content-type", b"text/plain; charset=utf-8"),
    (b"cache-control", b"no-store"),
    (b"content-length", str(len(_NOT_ALLOWED)).encode()),
]


class LoadTracker:
    """Requests in flight and the moving average of their latency: what a
    probe is answered from.

    Its methods take no lock. Code on one event loop calls them as they
    are; threads hold ``lock`` around every call (the caller holds the
    lock, as a pool's algorithm is called under the pool's)::

        with tracker.lock:
            started = tracker.begin()
        ...
        with tracker.lock:
            tracker.end(started)
    """

    __slots__ = ("alpha", "in_flight", "latency_ms", "lock")

    def __init__(self, *, alpha: float = DEFAULT_ALPHA) -> None:
        value: object = alpha  # checked as the caller may have passed anything
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
            raise ConfigError([Problem("alpha", f"must be a number in (0, 1], got {alpha!r}")])
        self.alpha = float(alpha)
        self.in_flight = 0
        #: None until the first sample; reported as 0.0.
        self.latency_ms: float | None = None
        self.lock = threading.Lock()

    def begin(self) -> float:
        """Count a request in; returns its start, for :meth:`end`."""
        self.in_flight += 1
        return perf_counter()

    def end(self, started: float, *, failed: bool = False) -> None:
        """Count the request that began at ``started`` out, and feed its
        latency to the average (a failed one only when that raises it)."""
        self.in_flight -= 1
        ms = (perf_counter() - started) * 1000.0
        old = self.latency_ms
        if old is None:
            self.latency_ms = ms
        elif not failed or ms > old:
            self.latency_ms = old + self.alpha * (ms - old)

    def report(self) -> bytes:
        """The probe's JSON body: ``{"in_flight": N, "latency_ms": X}``."""
        ms = self.latency_ms
        return b'{"in_flight": %d, "latency_ms": %r}' % (
            self.in_flight,
            0.0 if ms is None else round(ms, 3),
        )

    def answer(self, method: str) -> _Answer:
        """Status, headers and body for a request to the probe path: the
        report for GET (HEAD: its headers only), 405 for anything else."""
        if method != "GET" and method != "HEAD":
            return 405, _NOT_ALLOWED_HEADERS, _NOT_ALLOWED
        body = self.report()
        headers = [*_JSON_HEADERS, (b"content-length", b"%d" % len(body))]
        return 200, headers, b"" if method == "HEAD" else body


def _checked_path(path: str) -> str:
    value: object = path
    if not isinstance(value, str) or not value.startswith("/"):
        raise ConfigError([Problem("path", f"must be a path starting with '/', got {path!r}")])
    return path


def _is_async(app: object) -> bool:
    """Whether ``app`` is an async callable: a coroutine function (also one
    marked by asgiref) or an object whose ``__call__`` is one."""
    call = getattr(app, "__call__", None)  # noqa: B004 - the method itself is looked at
    if inspect.iscoroutinefunction(app) or inspect.iscoroutinefunction(call):
        return True
    # Before 3.12 (and inspect.markcoroutinefunction), asgiref marks for asyncio.
    return sys.version_info < (3, 12) and (
        asyncio.iscoroutinefunction(app) or asyncio.iscoroutinefunction(call)
    )


class LoadReportMiddleware:
    """Counts ``app``'s requests and answers the load probe on ``path``.

    ::

        app.add_middleware(LoadReportMiddleware)                       # FastAPI, Starlette
        app = LoadReportMiddleware(app)                                # any ASGI app
        flask_app.wsgi_app = LoadReportMiddleware(flask_app.wsgi_app)  # any WSGI app

    An async ``app`` gets an :class:`ASGILoadReportMiddleware`, anything
    else a :class:`WSGILoadReportMiddleware`; both are instances of this
    class. Put it as far out as you can, so that every request is counted
    and nothing before it answers the probe's path. ``tracker`` holds the
    counts (a :class:`LoadTracker`).
    A bad ``path`` or ``alpha`` is a :class:`~balancekit.ConfigError` here.
    """

    app: Any
    path: str
    tracker: LoadTracker

    @overload
    def __new__(
        cls, app: ASGIApp, *, path: str = ..., alpha: float = ...
    ) -> ASGILoadReportMiddleware: ...

    @overload
    def __new__(
        cls, app: _WSGIApp, *, path: str = ..., alpha: float = ...
    ) -> WSGILoadReportMiddleware: ...

    def __new__(
        cls, app: Any, *, path: str = DEFAULT_PATH, alpha: float = DEFAULT_ALPHA
    ) -> LoadReportMiddleware:
        if cls is LoadReportMiddleware:
            cls = ASGILoadReportMiddleware if _is_async(app) else WSGILoadReportMiddleware
        return object.__new__(cls)

    # No __init__ here: each form's own keeps the app's type, and mypy reads
    # the overloads of __new__ only when the class defines no __init__.

    def _setup(self, app: Any, path: str, alpha: float) -> None:
        self.app = app
        self.path = _checked_path(path)
        self.tracker = LoadTracker(alpha=alpha)


class ASGILoadReportMiddleware(LoadReportMiddleware):
    """The ASGI form: no lock, one event loop per instance."""

    app: ASGIApp

    def __init__(
        self, app: ASGIApp, *, path: str = DEFAULT_PATH, alpha: float = DEFAULT_ALPHA
    ) -> None:
        self._setup(app, path, alpha)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["path"] == self.path:
            await self._answer(scope["method"], send)
            return
        tracker = self.tracker
        started = tracker.begin()
        complete = failed = False

        async def counted_send(message: Message) -> None:
            nonlocal complete, failed
            await send(message)
            if message.get("more_body", False) or complete:
                return
            kind = message["type"]
            if kind == "http.response.start":
                failed = message["status"] >= 500
            elif kind == "http.response.body" or kind == "http.response.pathsend":
                complete = True
                tracker.end(started, failed=failed)

        try:
            await self.app(scope, receive, counted_send)
        finally:
            if not complete:  # raised, cancelled, or returned without a whole response
                complete = True
                tracker.end(started, failed=True)

    async def _answer(self, method: str, send: Send) -> None:
        status, headers, body = self.tracker.answer(method)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class WSGILoadReportMiddleware(LoadReportMiddleware):
    """The WSGI form: safe under threaded servers (one lock, held briefly)."""

    app: _WSGIApp

    def __init__(
        self, app: _WSGIApp, *, path: str = DEFAULT_PATH, alpha: float = DEFAULT_ALPHA
    ) -> None:
        self._setup(app, path, alpha)

    def __call__(self, environ: _Environ, start_response: _StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == self.path:
            status, headers, body = self.tracker.answer(environ["REQUEST_METHOD"])
            start_response(_status_line(status), _text(headers))
            return [body]
        tracker = self.tracker
        with tracker.lock:
            started = tracker.begin()
        counted = _CountedResponse(tracker, started, start_response)
        try:
            counted.response = self.app(environ, counted.start_response)
        except BaseException:
            counted.close()
            raise
        return counted


class _CountedResponse:
    """A WSGI response iterable that counts its request out when the server
    closes it (once, however often ``close`` is called). Its
    ``start_response`` notes whether the status is a 5xx, on its way to the
    server's."""

    __slots__ = ("_start_response", "_started", "_tracker", "failed", "response")

    def __init__(
        self, tracker: LoadTracker, started: float, start_response: _StartResponse
    ) -> None:
        self._tracker: LoadTracker | None = tracker
        self._started = started
        self._start_response = start_response
        self.failed = True  # until a status below 500 is given
        self.response: Iterable[bytes] = ()

    def start_response(self, status: str, headers: Any, exc_info: Any = None) -> Any:
        self.failed = status >= "5"
        return self._start_response(status, headers, exc_info)

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.response)

    def close(self) -> None:
        tracker, self._tracker = self._tracker, None
        if tracker is None:
            return
        try:
            close = getattr(self.response, "close", None)
            if close is not None:
                close()
        finally:
            with tracker.lock:
                tracker.end(self._started, failed=self.failed)


def _status_line(status: int) -> str:
    return "200 OK" if status == 200 else "405 Method Not Allowed"


def _text(headers: list[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    return [(name.decode("latin-1"), value.decode("latin-1")) for name, value in headers]
