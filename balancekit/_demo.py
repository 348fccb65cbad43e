"""What ``balancekit demo`` runs: three local backends, a balancer, and traffic.

So that the dashboard has something to show, a small load generator sends
about 20 requests a second through the balancer, and the slow backend fails
(500s, its health check too) for 10 s out of every 30: watch it go
unhealthy and come back.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections.abc import Callable
from typing import Any

from ._balancer import Balancer

logger = logging.getLogger("balancekit")

#: Name and typical answer time (seconds) of each demo backend.
BACKENDS = (("fast", 0.005), ("medium", 0.02), ("slow", 0.08))
#: The slow backend fails for the last FAIL_SECONDS of every CYCLE_SECONDS.
CYCLE_SECONDS, FAIL_SECONDS = 30.0, 10.0
#: The load generator: requests a second, and bounds so it always stops.
RATE = 20.0
MAX_REQUESTS, MAX_SECONDS = 200_000, 4 * 3600.0


def failing(elapsed: float) -> bool:
    """Whether the flaky backend fails, ``elapsed`` seconds after it started:
    fine for the first 20 s, then failing 10 s out of every 30."""
    return elapsed % CYCLE_SECONDS >= CYCLE_SECONDS - FAIL_SECONDS


def backend_app(name: str, delay: float, *, flaky: bool = False) -> Callable[..., Any]:
    """A tiny ASGI app that answers after ``delay`` seconds, naming itself;
    a ``flaky`` one answers 500 (health checks included) part of the time."""
    started = time.monotonic()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        status = 500 if flaky and failing(time.monotonic() - started) else 200
        await asyncio.sleep(delay)
        body = json.dumps({"backend": name, "path": scope["path"]}).encode() + b"\n"
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})

    return app


async def traffic(url: str) -> None:
    """About RATE requests a second to ``url``, until cancelled or the bounds."""
    import aiohttp

    started = time.monotonic()
    async with aiohttp.ClientSession() as session:
        for _ in range(MAX_REQUESTS):
            if time.monotonic() - started > MAX_SECONDS:
                break
            try:
                async with session.get(url) as response:
                    await response.read()
            except aiohttp.ClientError as exc:
                logger.debug("demo traffic: %s", exc)
            await asyncio.sleep(1 / RATE)


def config(urls: list[str]) -> dict[str, Any]:
    return {
        "pools": {
            "demo": {
                "backends": urls,
                "algorithm": "round_robin",
                "health_check": {
                    "type": "http",
                    "path": "/healthz",
                    "interval": 1,
                    "fall": 2,
                    "rise": 2,
                },
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
    from .asgi import BalanceMiddleware, not_found

    backends = [
        make_server(backend_app(name, delay, flaky=name == "slow"), lifespan="off")
        for (name, delay) in BACKENDS
    ]
    front = make_server(BalanceMiddleware(not_found, balancer=balancer))
    tasks = [
        asyncio.ensure_future(s.serve(sockets=[k]))
        for s, k in zip(backends, backend_socks, strict=True)
    ]
    host, port = balancer_sock.getsockname()[:2]
    load = asyncio.ensure_future(traffic(f"http://{host}:{port}/demo"))
    try:
        await front.serve(sockets=[balancer_sock])
    finally:
        load.cancel()
        await asyncio.gather(load, return_exceptions=True)
        for server in backends:
            server.should_exit = True
        await asyncio.gather(*tasks, return_exceptions=True)
