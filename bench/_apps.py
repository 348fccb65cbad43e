"""The ASGI apps the proxy benchmark runs under uvicorn.

``backend``: a fast upstream answering 100 bytes.
``balancekit_app``: balancekit's middleware over the backends in BENCH_BACKENDS.
``reference``: a minimal hand-written aiohttp proxy, the yardstick for what
Python does with the same client: one shared session, round robin,
headers and body passed through, response streamed.
"""

from __future__ import annotations

import itertools
import os
from typing import Any

import aiohttp

from balancekit.asgi import BalanceMiddleware

BACKENDS = [u for u in os.environ.get("BENCH_BACKENDS", "").split(",") if u]
BODY = b"x" * 100
HOP_BY_HOP = {b"connection", b"keep-alive", b"transfer-encoding", b"te", b"upgrade"}


async def _lifespan(receive: Any, send: Any) -> None:
    while True:
        message = await receive()
        await send({"type": message["type"] + ".complete"})
        if message["type"] == "lifespan.shutdown":
            return


async def backend(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
        return
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/plain"), (b"content-length", b"100")],
        }
    )
    await send({"type": "http.response.body", "body": BODY})


async def _not_found(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
        return
    await send({"type": "http.response.start", "status": 404, "headers": []})
    await send({"type": "http.response.body", "body": b""})


balancekit_app = BalanceMiddleware(
    _not_found,
    config={
        "transport": os.environ.get("BENCH_TRANSPORT", "aiohttp"),
        "pools": {"bench": {"backends": BACKENDS}},
        "routes": [{"prefix": "/", "pool": "bench"}],
    },
)

_turn = itertools.cycle(BACKENDS or ["http://127.0.0.1:1"])
_session: aiohttp.ClientSession | None = None


async def reference(scope: Any, receive: Any, send: Any) -> None:
    global _session
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
        return
    if _session is None:
        _session = aiohttp.ClientSession(auto_decompress=False)
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    headers = [(k.decode(), v.decode()) for k, v in scope["headers"] if k != b"host"]
    url = next(_turn) + scope["path"]
    async with _session.request(
        scope["method"], url, headers=headers, data=body or None, allow_redirects=False
    ) as response:
        await send(
            {
                "type": "http.response.start",
                "status": response.status,
                "headers": [
                    (k.lower(), v) for k, v in response.raw_headers if k.lower() not in HOP_BY_HOP
                ],
            }
        )
        async for chunk in response.content.iter_any():
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
