"""``BalanceMiddleware`` for any ASGI app (Starlette, FastAPI, ...)."""

from __future__ import annotations

import asyncio
from urllib.parse import quote

from ._admin import MAX_BODY
from ._balancer import Balancer, ConfigInput, balancer_from
from ._classify import Admin, Classification, Refuse, Routed, Status
from ._engine_async import _respond
from ._problem import problem
from ._types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["BalanceMiddleware"]

_SCHEMES = {"ws": "http", "wss": "https"}


class BalanceMiddleware:
    """Proxies requests on the configured routes; everything else reaches ``app``.

    ::

        app.add_middleware(BalanceMiddleware, config="balancekit.toml")

    The configuration is checked here, when the app is built, so a mistake
    is a :class:`~balancekit.ConfigError` at start-up, never on a request.
    Health checks start with the server's lifespan (or, when the server
    sends none, on the first routed request) and stop with its shutdown.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        config: ConfigInput | None = None,
        balancer: Balancer | None = None,
    ) -> None:
        self.app = app
        self.balancer = balancer_from(config, balancer)
        # Whether this middleware started the balancer's background work
        # (at the lifespan's startup, or else on the first routed request).
        self._started = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self._lifespan(scope, receive, send)
            return
        if kind != "http" and kind != "websocket":
            await self.app(scope, receive, send)
            return
        balancer = self.balancer
        raw = scope.get("raw_path")
        client = scope.get("client")
        scheme = scope.get("scheme") or "http"
        verdict = balancer.classify(
            scope.get("method", "GET"),
            raw.decode("latin-1") if raw else quote(scope["path"]),
            scope["headers"],
            query=scope.get("query_string", b"").decode("latin-1"),
            client_ip=client[0] if client else "",
            scheme=_SCHEMES.get(scheme, scheme),
            http_version=scope.get("http_version", "1.1"),
        )
        if type(verdict) is Routed:
            if not self._started:  # no lifespan from the server
                await self.startup()
            await balancer.engine().handle(verdict, scope, receive, send)
        else:
            await self._not_proxied(verdict, scope, receive, send)

    async def _not_proxied(
        self, verdict: Classification, scope: Scope, receive: Receive, send: Send
    ) -> None:
        """Answer a request that is not to be proxied, as classified: the
        refusal, the status page, the admin API, or the wrapped app (for
        ``balancekit serve``'s fast path, which classified it already)."""
        kind = scope["type"]
        balancer = self.balancer
        client = scope.get("client")
        if type(verdict) is Refuse:
            if kind == "http":
                await _respond(send, verdict.status, verdict.headers, verdict.body)
            else:
                await send({"type": "websocket.close", "code": 1008})
        elif type(verdict) is Status and kind == "http":
            endpoint = balancer.status_endpoint
            assert endpoint is not None  # no Status verdict without one
            await endpoint.handle(
                verdict.path,
                client[0] if client else "",
                scope["headers"],
                scope.get("query_string", b"").decode("latin-1"),
                send,
            )
        elif type(verdict) is Admin and kind == "http":
            admin = balancer.admin_endpoint
            assert admin is not None  # no Admin verdict without one
            body = await _read_body(receive, MAX_BODY + 1)
            answer = await asyncio.to_thread(  # a reload reads and builds: not on the loop
                admin.respond,
                scope.get("method", "GET"),
                verdict.raw_path,
                client[0] if client else "",
                list(scope["headers"]),
                body,
            )
            await _respond(send, *answer)
        else:
            await self.app(scope, receive, send)

    async def startup(self) -> None:
        """Start the balancer's background work in this loop (idempotent):
        what the lifespan's startup does, and ``balancekit serve``."""
        self._started = True
        await self.balancer.astart()

    async def shutdown(self) -> None:
        """Stop it and close this loop's upstream connections."""
        await self.balancer.aclose()

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The wrapped app still gets every lifespan message; we act on them
        # as they pass: health checks start at startup, connections close at
        # shutdown.
        async def lifespan_receive() -> Message:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await self.startup()
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
            return message

        await self.app(scope, lifespan_receive, send)


async def _read_body(receive: Receive, limit: int) -> bytes:
    """The request body, or its first ``limit`` bytes and more (for an
    answer that says it is too large without reading it all)."""
    body = b""
    while len(body) < limit:
        message = await receive()
        if message["type"] != "http.request":
            break
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    return body


async def not_found(scope: Scope, receive: Receive, send: Send) -> None:
    """The app behind a standalone balancer (``balancekit serve``, the demo):
    a 404 problem for a path no route covers, and a lifespan that completes."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return
    if scope["type"] == "http":
        await _respond(send, *problem(404, "no route"))
