"""Builders shared by the proxy tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from balancekit import Balancer
from balancekit._types import Receive, Scope, Send
from balancekit.asgi import BalanceMiddleware
from balancekit.wsgi import BalanceMiddleware as WSGIBalanceMiddleware
from tests.upstreams import complete_lifespan


async def app_fallback(scope: Scope, receive: Receive, send: Send) -> None:
    """The wrapped application: answers 200 "app" to every unrouted request."""
    if scope["type"] == "lifespan":
        await complete_lifespan(receive, send)
        return
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"x-app", b"1")]})
    await send({"type": "http.response.body", "body": b"app"})


def wsgi_fallback(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    """app_fallback's WSGI twin."""
    start_response("200 OK", [("x-app", "1"), ("content-length", "3")])
    return [b"app"]


def pool_config(urls: list[str], **pool: Any) -> dict[str, Any]:
    return {"backends": urls, **pool}


def balanced(
    serve: Callable[..., Any],
    urls: list[Any],
    *,
    engine: str = "aiohttp",
    prefix: str = "/api/",
    strip_prefix: bool = False,
    pool: dict[str, Any] | None = None,
    **top: Any,
) -> tuple[Any, Balancer]:
    """A balancer serving ``urls`` on ``prefix``, in front of app_fallback.

    ``engine`` names how requests are proxied: an async transport ("aiohttp",
    "httpx", "httptools") under the ASGI middleware and uvicorn; "wsgi" or
    "wsgi-httpx", the WSGI middleware in front of a WSGI app_fallback, with
    the sync engine's default client or httpx; "lean", the ASGI middleware
    on ``balancekit serve``'s own server.
    """
    wsgi = engine.startswith("wsgi")
    lean = engine == "lean"
    transport = engine
    if wsgi:
        transport = "httpx" if engine.endswith("httpx") else "aiohttp"
    elif lean:
        transport = "httptools"
    config = {
        "transport": transport,
        "pools": {"api": pool_config(urls, **(pool or {}))},
        "routes": [{"prefix": prefix, "pool": "api", "strip_prefix": strip_prefix}],
        **top,
    }
    balancer = Balancer(config)
    if wsgi:
        server = serve(WSGIBalanceMiddleware(wsgi_fallback, balancer=balancer), wsgi=True)
    else:
        server = serve(BalanceMiddleware(app_fallback, balancer=balancer), lean=lean)
    return server, balancer
