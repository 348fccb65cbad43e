"""Builders shared by the proxy tests."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from balancekit import Balancer
from balancekit._types import Receive, Scope, Send
from balancekit.asgi import BalanceMiddleware
from balancekit.wsgi import BalanceMiddleware as WSGIBalanceMiddleware
from tests.conftest import free_port
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
    on ``balancekit serve``'s own server, and "lean-slow" the same with its
    fast path off (every request through the coroutine path).
    """
    wsgi = engine.startswith("wsgi")
    lean = engine in ("lean", "lean-slow")
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
        app = BalanceMiddleware(app_fallback, balancer=balancer)
        server = serve(app, lean=True, fast=engine == "lean") if lean else serve(app)
    return server, balancer


@contextmanager
def flask_example_under_gunicorn(
    upstreams: list[Any], tmp_path: Path, metrics_dir: Path
) -> Iterator[str]:
    """The Flask example under two gunicorn workers (as in
    test_observability) with a shared multiprocess directory; its URL."""
    project = Path(__file__).parent.parent / "example_projects" / "flask_app"
    config = tmp_path / "balancekit.toml"
    config.write_text(
        (project / "balancekit.toml")
        .read_text()
        .replace("http://127.0.0.1:9001", upstreams[0].url)
        .replace("http://127.0.0.1:9002", upstreams[1].url)
    )
    port = free_port()
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "gunicorn", "--workers", "2", "--threads", "4"),
            *("--bind", f"127.0.0.1:{port}", "app:create_app()"),
        ],
        cwd=project,
        env={
            **os.environ,
            "BALANCEKIT_CONFIG": str(config),
            "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
        },
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                httpx.get(url + "/")
                break
            except httpx.ConnectError:
                assert process.poll() is None, process.communicate()[1]
                assert time.monotonic() < deadline
                time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        process.communicate(timeout=20)
