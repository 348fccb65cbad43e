"""What ``balancekit demo`` runs: three local backends and a balancer."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Callable
from typing import Any

from ._balancer import Balancer

#: Name and typical answer time (seconds) of each demo backend.
BACKENDS = (("fast", 0.005), ("medium", 0.02), ("slow", 0.08))


def backend_app(name: str, delay: float) -> Callable[..., Any]:
    """A tiny ASGI app that answers after ``delay`` seconds, naming itself."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await asyncio.sleep(delay)
        body = json.dumps({"backend": name, "path": scope["path"]}).encode() + b"\n"
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})

    return app


def config(urls: list[str]) -> dict[str, Any]:
    return {
        "pools": {
            "demo": {
                "backends": urls,
                "algorithm": "round_robin",
                "health_check": {"type": "http", "path": "/healthz", "interval": 2},
            }
        },
        "routes": [{"prefix": "/", "pool": "demo"}],
        "status": {"enabled": True},
    }


async def run(
    balancer: Balancer,
    balancer_sock: socket.socket,
    backend_socks: list[socket.socket],
    make_server: Callable[..., Any],
) -> None:
    from .asgi import BalanceMiddleware
    from .cli import _not_found

    backends = [make_server(backend_app(name, delay), lifespan="off") for (name, delay) in BACKENDS]
    front = make_server(BalanceMiddleware(_not_found, balancer=balancer))
    tasks = [
        asyncio.ensure_future(s.serve(sockets=[k]))
        for s, k in zip(backends, backend_socks, strict=True)
    ]
    try:
        await front.serve(sockets=[balancer_sock])
    finally:
        for server in backends:
            server.should_exit = True
        await asyncio.gather(*tasks, return_exceptions=True)
