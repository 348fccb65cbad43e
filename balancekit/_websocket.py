"""WebSocket proxying for routed prefixes (ASGI), over aiohttp's client.

The client's handshake is answered only once the backend accepted its own,
so the subprotocol the backend chose is the one the client gets. Messages
are then pumped both ways until either side closes; its close code is
passed on to the other side.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING

import aiohttp
from yarl import URL

from ._exceptions import NoEligibleBackend
from ._transports.aiohttp import AIOHTTP_ERRORS, translate_error

if TYPE_CHECKING:
    from ._classify import Routed
    from ._transports.aiohttp import AiohttpTransport
    from ._types import Receive, Scope, Send

logger = logging.getLogger("balancekit")

#: Handshake headers aiohttp writes itself; the client's copies are dropped.
_HANDSHAKE = frozenset(
    {
        b"sec-websocket-key",
        b"sec-websocket-version",
        b"sec-websocket-extensions",
        b"sec-websocket-protocol",
        b"host",
    }
)
#: RFC 6455 close code for "the server's upstream failed" (used by proxies).
BAD_GATEWAY = 1014


async def proxy_websocket(
    transport: AiohttpTransport, routed: Routed, scope: Scope, receive: Receive, send: Send
) -> None:
    """Proxy one routed WebSocket session through ``transport``'s session."""
    message = await receive()
    if message["type"] != "websocket.connect":
        return
    pool, request = routed.pool, routed.request
    try:
        backend = pool.acquire(request)
    except NoEligibleBackend as exc:
        logger.warning("pool %s: %s", pool.name, exc.detail)
        await send({"type": "websocket.close", "code": 1013})
        return
    started = time.perf_counter()
    headers = [
        (k.decode("latin-1"), v.decode("latin-1"))
        for k, v in routed.headers[1:]
        if k not in _HANDSHAKE
    ]
    if pool.config.preserve_host:
        host = request.header("host")
        if host:
            headers.append(("Host", host))
    scheme = "wss" if backend.scheme == "https" else "ws"
    url = URL(f"{scheme}://{backend.host_header}{backend.base_path}{routed.target}", encoded=True)
    session = transport.session()
    tls = backend.tls  # the pool's TLS for a wss:// backend, as for its requests
    try:
        upstream = await session.ws_connect(
            url,
            headers=headers,
            protocols=scope.get("subprotocols", ()),
            autoclose=False,
            max_msg_size=0,
            timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=5.0),
            ssl=True if tls is None else tls.context,
            server_hostname=None if tls is None else tls.server_name,
        )
    except BaseException as exc:  # counted whatever it was, then raised again unless aiohttp's
        # Counted before the client hears of it, whatever went wrong.
        pool.release(backend, ok=False, latency_ms=(time.perf_counter() - started) * 1000)
        if not isinstance(exc, AIOHTTP_ERRORS):
            raise
        error = translate_error(exc)
        logger.warning("pool %s: websocket upstream failed: %s", pool.name, error.detail)
        await send({"type": "websocket.close", "code": BAD_GATEWAY})
        return
    try:
        async with upstream:
            await send({"type": "websocket.accept", "subprotocol": upstream.protocol})
            await _pump(upstream, receive, send)
    finally:
        pool.release(backend, ok=True, latency_ms=(time.perf_counter() - started) * 1000)


async def _pump(upstream: aiohttp.ClientWebSocketResponse, receive: Receive, send: Send) -> None:
    async def client_to_upstream() -> None:
        while True:
            message = await receive()
            if message["type"] == "websocket.receive":
                if message.get("text") is not None:
                    await upstream.send_str(message["text"])
                else:
                    await upstream.send_bytes(message.get("bytes") or b"")
            else:  # websocket.disconnect
                await upstream.close(code=message.get("code", 1000))
                return

    async def upstream_to_client() -> None:
        async for msg in upstream:
            if msg.type is aiohttp.WSMsgType.TEXT:
                await send({"type": "websocket.send", "text": msg.data})
            elif msg.type is aiohttp.WSMsgType.BINARY:
                await send({"type": "websocket.send", "bytes": msg.data})
            elif msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.ERROR):
                break
        code = upstream.close_code or 1000
        with contextlib.suppress(OSError, RuntimeError):  # the client may be gone already
            await send({"type": "websocket.close", "code": code})

    tasks = [
        asyncio.ensure_future(client_to_upstream()),
        asyncio.ensure_future(upstream_to_client()),
    ]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
