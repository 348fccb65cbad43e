"""``BalanceMiddleware``: first in ``MIDDLEWARE``, under WSGI and ASGI.

Routed paths are proxied by balancekit's engines (the sync one under WSGI,
the async one under ASGI, with no sync/async switch per request); the
status path is served when enabled; everything else goes on to Django.

``LoadReportMiddleware``: the backend side of a Prequal probe for a Django
site (see ``balancekit.load_report``), first in ``MIDDLEWARE``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable
from functools import partial
from typing import Any
from urllib.parse import quote

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.http import HttpRequest, HttpResponse, HttpResponseBase, StreamingHttpResponse

from balancekit.adapter import Admin, Classification, Refuse, Routed, Status
from balancekit.load_report import DEFAULT_ALPHA, DEFAULT_PATH, LoadTracker
from balancekit.wsgi import classify_environ, environ_headers

from .runtime import current


class ProxiedResponse(StreamingHttpResponse):
    """A streamed upstream answer whose headers go out exactly as received
    (repeated ones such as Set-Cookie included), which Django's header
    dictionary cannot hold."""

    def __init__(self, content: Any, status: int, headers: list[tuple[str, str]]) -> None:
        super().__init__(content, status=status)
        self.raw_headers = headers

    def items(self) -> Any:  # what Django's WSGI and ASGI handlers send
        return iter(self.raw_headers)

    def has_header(self, header: str) -> bool:
        lower = header.lower()
        return any(name.lower() == lower for name, _ in self.raw_headers)


def _text(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in headers]


class BalanceMiddleware:
    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[HttpRequest], Any]) -> None:
        self.get_response = get_response
        self.runtime = current()  # settings are checked here, at start-up
        self.is_async = iscoroutinefunction(get_response)
        self._started = False  # the balancer's background work, under ASGI
        if self.is_async:
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest) -> Any:
        if self.is_async:
            return self.__acall__(request)
        runtime = self.runtime
        runtime.start()
        balancer = runtime.balancer
        environ = request.META
        verdict = classify_environ(balancer, environ)
        if type(verdict) is Routed:
            request.balancekit_request_id = verdict.request_id_text
            balancer.start_background()
            captured: list[Any] = []

            def start_response(
                status: str, headers: list[tuple[str, str]], exc_info: Any = None
            ) -> None:
                captured[:] = [int(status.split(" ", 1)[0]), headers]

            body = balancer.sync_engine().handle(verdict, environ, start_response)
            return ProxiedResponse(body, *captured)
        if type(verdict) is Status:
            return self._status(request, verdict.path, _is_staff(request))
        if type(verdict) is Admin:
            return self._admin(request, verdict)
        return self._answer(verdict) or self.get_response(request)

    async def __acall__(self, request: HttpRequest) -> Any:
        runtime = self.runtime
        if runtime._thread is None:
            await asyncio.to_thread(runtime.start)  # the first request: reads the database
        verdict = _classify_scope(runtime.balancer, request)
        if type(verdict) is Routed:
            request.balancekit_request_id = verdict.request_id_text
            if not self._started:  # Django's ASGI handler sends no lifespan
                self._started = True
                await runtime.balancer.astart()
            return await _proxy_async(runtime.balancer, verdict, request)
        if type(verdict) is Status:
            staff = await asyncio.to_thread(_is_staff, request)
            return self._status(request, verdict.path, staff)
        if type(verdict) is Admin:
            return await asyncio.to_thread(self._admin, request, verdict)
        return self._answer(verdict) or await self.get_response(request)

    @staticmethod
    def _answer(verdict: Classification) -> HttpResponseBase | None:
        """The answer to a refused request; None when Django has it."""
        if type(verdict) is Refuse:
            return _plain(verdict.status, verdict.headers, verdict.body)
        return None

    def _admin(self, request: HttpRequest, verdict: Admin) -> HttpResponseBase:
        """The admin HTTP API: its own Bearer token, never Django's session
        (a logged-in browser must not be able to change backends by a link)."""
        endpoint = self.runtime.balancer.admin_endpoint
        assert endpoint is not None  # no Admin verdict without one
        scope = getattr(request, "scope", None)
        headers = scope["headers"] if scope is not None else environ_headers(request.META)
        answer = endpoint.respond(
            request.method or "GET",
            verdict.raw_path,
            request.META.get("REMOTE_ADDR", ""),
            headers,
            request.body,
        )
        return _plain(*answer)

    def _status(self, request: HttpRequest, path: str, staff: bool) -> HttpResponseBase:
        """The status path: with no token and no allow list of its own, for
        staff only (as the admin); else by its token and allow list."""
        balancer = self.runtime.balancer
        endpoint = balancer.status_endpoint
        assert endpoint is not None  # no Status verdict without one
        config = balancer.config.status
        if not config.token and not config.allow and not staff:
            return _plain(403, [(b"content-type", b"text/plain; charset=utf-8")], b"staff only\n")
        scope = getattr(request, "scope", None)
        headers = scope["headers"] if scope is not None else environ_headers(request.META)
        meta = request.META
        answer = endpoint.respond(
            path, meta.get("REMOTE_ADDR", ""), headers, meta.get("QUERY_STRING", "")
        )
        return _plain(*answer)


def _is_staff(request: HttpRequest) -> bool:
    """Whether the request's session is a staff user's. The middleware runs
    before Django's session and auth middleware, so it asks them itself."""
    from importlib import import_module

    from django.conf import settings
    from django.contrib.auth import get_user

    if "django.contrib.sessions" not in settings.INSTALLED_APPS:
        return False
    engine = import_module(settings.SESSION_ENGINE)
    request.session = engine.SessionStore(request.COOKIES.get(settings.SESSION_COOKIE_NAME))
    return bool(getattr(get_user(request), "is_staff", False))


def _plain(status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> HttpResponseBase:
    return ProxiedResponse(iter([body]), status, _text(headers))


def _classify_scope(balancer: Any, request: HttpRequest) -> Classification:
    """Classify a Django ASGI request from its scope: the raw path as sent
    (else the decoded one, encoded again) and the scope's header pairs."""
    scope = request.scope
    raw = scope.get("raw_path")
    if raw:
        raw_path = raw.decode("latin-1")
    else:
        raw_path = quote(request.path_info.encode("utf-8"), safe="/;=,@!$&'()*+:~%") or "/"
    client = scope.get("client")
    return balancer.classify(
        request.method or "GET",
        raw_path,
        scope["headers"],
        query=scope.get("query_string", b"").decode("latin-1"),
        client_ip=client[0] if client else "",
        scheme=scope.get("scheme") or "http",
        http_version=scope.get("http_version", "1.1"),
    )


async def _proxy_async(balancer: Any, routed: Routed, request: HttpRequest) -> HttpResponseBase:
    """Run the async engine for a Django ASGI request, its messages turned
    into a streamed response. Django has read the body already (its ASGI
    handler spools it); the engine gets it in chunks all the same."""
    scope = dict(request.scope)
    messages: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    ended = False

    async def receive() -> dict[str, Any]:
        nonlocal ended
        if not ended:
            chunk = request.read(64 * 1024)  # a spooled file: no waiting on the network
            ended = not chunk
            return {"type": "http.request", "body": chunk, "more_body": bool(chunk)}
        await asyncio.Event().wait()  # Django says nothing of disconnects: wait to be cancelled
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        await messages.put(message)

    engine = balancer.engine()
    task = asyncio.ensure_future(engine.handle(routed, scope, receive, send))
    start = await messages.get()
    if start["type"] != "http.response.start":  # pragma: no cover - the engine always starts
        raise RuntimeError(f"unexpected message {start['type']}")

    async def body() -> AsyncIterator[bytes]:
        try:
            while True:
                message = await messages.get()
                if message.get("body"):
                    yield message["body"]
                if not message.get("more_body", False):
                    break
        finally:
            if not task.done():
                task.cancel()

    return ProxiedResponse(body(), start["status"], _text(start["headers"]))


class LoadReportMiddleware:
    """Counts the site's requests in flight, keeps the moving average of
    their latency and answers the load probe (``GET`` or ``HEAD`` on
    ``path``) with ``{"in_flight": N, "latency_ms": X}``.

    Put it first in ``MIDDLEWARE``: a request counts from here until
    Django's handler closes its response (once the server has sent it, for
    a streamed one too), and a middleware above it that answered with a
    response of its own would keep the count from ever going down. The
    probe is answered here, before any other middleware, and not counted.
    Subclass to change ``path`` or ``alpha``; the same
    ``balancekit.load_report.LoadTracker`` as the ASGI and WSGI forms.
    """

    sync_capable = True
    async_capable = True
    #: The probe's path (``prequal``'s ``probe_path``).
    path = DEFAULT_PATH
    #: The weight of the newest latency sample in the average.
    alpha = DEFAULT_ALPHA

    def __init__(self, get_response: Callable[[HttpRequest], Any]) -> None:
        self.get_response = get_response
        # Its lock is taken under ASGI too: Django's ASGI handler closes a
        # response (and so counts it out) in a thread of its own.
        self.tracker = LoadTracker(alpha=self.alpha)
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest) -> Any:
        if self.is_async:
            return self.__acall__(request)
        if request.path_info == self.path:
            return self._answer(request)
        tracker = self.tracker
        with tracker.lock:
            started = tracker.begin()
        try:
            response = self.get_response(request)
        except BaseException:
            self._ended(started, failed=True)
            raise
        return self._counted(response, started)

    async def __acall__(self, request: HttpRequest) -> Any:
        if request.path_info == self.path:
            return self._answer(request)
        tracker = self.tracker
        with tracker.lock:
            started = tracker.begin()
        try:
            response = await self.get_response(request)
        except BaseException:  # Django turns exceptions into responses: a cancellation
            self._ended(started, failed=True)
            raise
        return self._counted(response, started)

    def _counted(self, response: HttpResponseBase, started: float) -> HttpResponseBase:
        # HttpResponseBase.close() runs _resource_closers once: it is how
        # Django's own FileResponse and handlers release what a response
        # holds, and close() is what both handlers and every WSGI server
        # call when the response has been sent.
        failed = response.status_code >= 500  # Django has made exceptions 500s
        response._resource_closers.append(partial(self._ended, started, failed=failed))
        return response

    def _ended(self, started: float, *, failed: bool = False) -> None:
        tracker = self.tracker
        with tracker.lock:
            tracker.end(started, failed=failed)

    def _answer(self, request: HttpRequest) -> HttpResponseBase:
        status, headers, body = self.tracker.answer(request.method or "GET")
        response = HttpResponse(body, status=status)
        for name, value in headers:
            response[name.decode("latin-1")] = value.decode("latin-1")
        return response


__all__ = ["BalanceMiddleware", "LoadReportMiddleware", "ProxiedResponse"]
