"""The ASGI apps the proxy benchmark runs under uvicorn (``--app-dir bench``).

``backend``: a fast upstream answering 100 bytes, with ``x-backend: $BENCH_NAME``
so the benchmark can see that a proxy spreads requests over every backend.

``balancekit_app``: balancekit's middleware, round robin over the backends in
``$BENCH_BACKENDS`` (comma-separated URLs), transport from ``$BENCH_TRANSPORT``.

``reference``: a minimal hand-written aiohttp proxy, the yardstick for what
Python does with the same client and none of balancekit's features. It is
kept honest, doing the work any real proxy must do: method, path, query,
headers and body go upstream (hop-by-hop headers dropped, X-Forwarded-For
and -Proto added, no invented headers, no cookie jar); status, headers and
the streamed body come back (hop-by-hop, Date and Server dropped, as the
serving uvicorn writes its own).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

import aiohttp
from lean_proxy import HOP_BY_HOP  # one list for both references (bench/ is on the path)
from yarl import URL

from balancekit.asgi import BalanceMiddleware

BACKENDS = [u for u in os.environ.get("BENCH_BACKENDS", "").split(",") if u]
BODY = b"x" * 100
REQUEST_DROP = HOP_BY_HOP | {b"host", b"x-forwarded-for", b"x-forwarded-proto"}
RESPONSE_DROP = HOP_BY_HOP | {b"date", b"server"}

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.shutdown" and _session is not None:
            await _session.close()
        await send({"type": message["type"] + ".complete"})
        if message["type"] == "lifespan.shutdown":
            return


_BACKEND_HEADERS = [
    (b"content-type", b"text/plain"),
    (b"content-length", str(len(BODY)).encode()),
    (b"x-backend", os.environ.get("BENCH_NAME", "backend").encode()),
]


async def backend(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
        return
    await send({"type": "http.response.start", "status": 200, "headers": _BACKEND_HEADERS})
    await send({"type": "http.response.body", "body": BODY})


async def _not_found(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
        return
    await send({"type": "http.response.start", "status": 404, "headers": []})
    await send({"type": "http.response.body", "body": b""})


def balancekit_config(transport: str, backends: list[str]) -> dict[str, Any]:
    """The full request path: round robin, an active health check, status
    counters (and their page), X-Forwarded-* (always on)."""
    return {
        "transport": transport,
        "pools": {
            "p": {
                "backends": backends,
                "algorithm": "round_robin",
                "health_check": {"type": "http", "path": "/health", "interval": 2},
            }
        },
        "routes": [{"prefix": "/", "pool": "p"}],
        "status": {"enabled": True, "path": "/_balancekit/"},
    }


balancekit_app = BalanceMiddleware(
    _not_found,
    config=balancekit_config(os.environ.get("BENCH_TRANSPORT", "aiohttp"), BACKENDS),
)

_turn = itertools.cycle(BACKENDS or ["http://127.0.0.1:1"])
_session: aiohttp.ClientSession | None = None


def _session_now() -> aiohttp.ClientSession:
    global _session
    if _session is None:  # inside the running loop, on the first request
        _session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
        )
    return _session


def _has_body(headers: list[tuple[bytes, bytes]]) -> bool:
    for name, value in headers:
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip(b"0")):
            return True
    return False


async def _request_body(receive: Receive) -> AsyncIterator[bytes]:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ConnectionResetError("client went away")
        if message.get("body"):
            yield message["body"]
        if not message.get("more_body"):
            return


def _upstream_headers(scope: Scope) -> list[tuple[str, str]]:
    headers = [
        (name.decode("latin-1"), value.decode("latin-1"))
        for name, value in scope["headers"]
        if name not in REQUEST_DROP
    ]
    client = scope.get("client")
    headers.append(("x-forwarded-for", client[0] if client else "unknown"))
    headers.append(("x-forwarded-proto", scope.get("scheme", "http")))
    return headers


async def reference(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
        return
    target = scope.get("raw_path") or scope["path"].encode()
    if scope.get("query_string"):
        target += b"?" + scope["query_string"]
    url = URL(next(_turn) + target.decode("latin-1"), encoded=True)
    body = _request_body(receive) if _has_body(scope["headers"]) else None
    async with _session_now().request(
        scope["method"], url, headers=_upstream_headers(scope), data=body, allow_redirects=False
    ) as response:
        headers = [
            (name.lower(), value)
            for name, value in response.raw_headers
            if name.lower() not in RESPONSE_DROP
        ]
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
        async for chunk in response.content.iter_any():
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
