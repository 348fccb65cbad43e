"""``BalanceMiddleware``: first in ``MIDDLEWARE``, under WSGI and ASGI.

Routed paths are proxied by balancekit's engines (the sync one under WSGI,
the async one under ASGI, with no sync/async switch per request); the
status path is served when enabled; everything else goes on to Django.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any
from urllib.parse import quote

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.http import HttpRequest, HttpResponseBase, StreamingHttpResponse

from balancekit._engine_sync import environ_headers
from balancekit._problem import bad_request
from balancekit._routing import BadPath, Route, normalize_path
from balancekit.status import StatusEndpoint
from balancekit.wsgi import request_path

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
        config = self.runtime.balancer.config.status
        self.status = StatusEndpoint(self.runtime.balancer) if config.enabled else None
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest) -> Any:
        if self.is_async:
            return self.__acall__(request)
        runtime = self.runtime
        runtime.start()
        environ = request.META
        routed = self._route(request_path(environ), request)
        if routed is None:
            return self.get_response(request)
        if isinstance(routed, HttpResponseBase):
            return routed
        if isinstance(routed, _StatusRequest):
            return self._status(request, routed.path, _is_staff(request))
        route, raw_path, path = routed
        balancer = runtime.balancer
        balancer.start_background()
        captured: list[Any] = []

        def start_response(
            status: str, headers: list[tuple[str, str]], exc_info: Any = None
        ) -> None:
            captured[:] = [int(status.split(" ", 1)[0]), headers]

        body = balancer.sync_engine().handle(route, path, raw_path, environ, start_response)
        return ProxiedResponse(body, *captured)

    async def __acall__(self, request: HttpRequest) -> Any:
        runtime = self.runtime
        if runtime._thread is None:
            await asyncio.to_thread(runtime.start)  # the first request: reads the database
        routed = self._route(_raw(request), request)
        if routed is None:
            return await self.get_response(request)
        if isinstance(routed, HttpResponseBase):
            return routed
        if isinstance(routed, _StatusRequest):
            staff = await asyncio.to_thread(_is_staff, request)
            return self._status(request, routed.path, staff)
        route, raw_path, path = routed
        return await _proxy_async(runtime.balancer, route, path, raw_path, request)

    def _status(self, request: HttpRequest, path: str, staff: bool) -> HttpResponseBase:
        """The status path: with no token and no allow list of its own, for
        staff only (as the admin); else by its token and allow list."""
        assert self.status is not None
        config = self.runtime.balancer.config.status
        if not config.token and not config.allow and not staff:
            return _plain(403, [(b"content-type", b"text/plain; charset=utf-8")], b"staff only\n")
        scope = getattr(request, "scope", None)
        headers = scope["headers"] if scope is not None else environ_headers(request.META)
        meta = request.META
        answer = self.status.respond(
            path, meta.get("REMOTE_ADDR", ""), headers, meta.get("QUERY_STRING", "")
        )
        return _plain(*answer)

    def _route(
        self, raw_text: str, request: HttpRequest
    ) -> tuple[Route, str, str] | HttpResponseBase | _StatusRequest | None:
        """What to do: proxy on a route, answer here (a bad path, the status
        path), or (None) let Django have it."""
        balancer = self.runtime.balancer
        try:
            raw_path, path = normalize_path(raw_text)
        except (BadPath, UnicodeDecodeError) as exc:
            if isinstance(exc, UnicodeDecodeError) and not balancer.routes.covers_raw(raw_text):
                return None
            status, headers, body = bad_request(str(exc))
            return _plain(status, headers, body)
        if self.status is not None and self.status.matches(path):
            return _StatusRequest(path)
        route = balancer.routes.match(path)
        return None if route is None else (route, raw_path, path)


class _StatusRequest:
    """The request is for the status path (answered once the user is known)."""

    def __init__(self, path: str) -> None:
        self.path = path


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


def _raw(request: HttpRequest) -> str:
    """The request path as sent: the ASGI scope's raw_path, else encoded again."""
    scope = getattr(request, "scope", None)
    if scope is not None and scope.get("raw_path"):
        return str(scope["raw_path"].decode("latin-1"))
    return quote(request.path_info.encode("utf-8"), safe="/;=,@!$&'()*+:~%") or "/"


async def _proxy_async(
    balancer: Any, route: Route, path: str, raw_path: str, request: HttpRequest
) -> HttpResponseBase:
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
    task = asyncio.ensure_future(engine.handle(route, path, raw_path, scope, receive, send))
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


__all__ = ["BalanceMiddleware", "ProxiedResponse"]
