"""``BalanceMiddleware`` for any ASGI app (Starlette, FastAPI, ...)."""

from __future__ import annotations

import asyncio
from urllib.parse import quote

from ._balancer import Balancer, ConfigInput, balancer_from
from ._engine_async import AsyncEngine, _respond
from ._problem import bad_request
from ._routing import BadPath, normalize_path
from ._types import ASGIApp, Message, Receive, Scope, Send
from .status import StatusEndpoint

__all__ = ["BalanceMiddleware"]


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
        status = self.balancer.config.status
        self.status = StatusEndpoint(self.balancer) if status.enabled else None
        # The engine of the loop this middleware last served, to skip the
        # balancer's per-loop lookup on every request.
        self._engine: AsyncEngine | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self._lifespan(scope, receive, send)
            return
        if kind != "http" and kind != "websocket":
            await self.app(scope, receive, send)
            return
        raw = scope.get("raw_path")
        raw_text = raw.decode("latin-1") if raw else quote(scope["path"])
        try:
            raw_path, path = normalize_path(raw_text)
        except (BadPath, UnicodeDecodeError) as exc:
            if isinstance(exc, UnicodeDecodeError) and not self.balancer.routes.covers_raw(
                raw_text
            ):
                # Not UTF-8, and not ours: the app decides what it means.
                await self.app(scope, receive, send)
                return
            if kind == "http":
                await _respond(send, *bad_request(str(exc)))
            else:
                await send({"type": "websocket.close", "code": 1008})
            return
        if self.status is not None and kind == "http" and self.status.matches(path):
            client = scope.get("client")
            await self.status.handle(
                path,
                client[0] if client else "",
                scope["headers"],
                scope.get("query_string", b"").decode("latin-1"),
                send,
            )
            return
        route = self.balancer.routes.match(path)
        if route is None:
            await self.app(scope, receive, send)
            return
        engine = self._engine
        if engine is None or engine.loop is not asyncio.get_running_loop():
            engine = self._engine = self.balancer.engine()
        await engine.handle(route, path, raw_path, scope, receive, send)

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The wrapped app still gets every lifespan message; we act on them
        # as they pass: health checks start at startup, connections close at
        # shutdown.
        async def lifespan_receive() -> Message:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await self.balancer.astart()
            elif message["type"] == "lifespan.shutdown":
                await self.balancer.aclose()
            return message

        await self.app(scope, lifespan_receive, send)
