"""The backends of tests/test_load_report.py: the same few endpoints as a raw
ASGI app, a WSGI app and Django views (this module is also their URLconf).

- ``/fast``: answers at once;
- ``/slow?ms=N``: answers after N milliseconds;
- ``/hold``: answers once the app's ``Gate`` is opened (10 s at most);
- ``/raise``: raises before answering;
- ``/unavailable``: answers 503 at once;
- ``/stream``: 200 chunks 10 ms apart, noting in ``Gate.cut`` when it is
  stopped before the end (the client went away).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs

from django.http import HttpRequest, HttpResponse, StreamingHttpResponse
from django.urls import path

from tests.upstreams import complete_lifespan

HOLD_LIMIT = 10.0
CHUNKS = 200


class Gate:
    """Opened by a test to let held requests answer."""

    def __init__(self) -> None:
        self.open = threading.Event()
        self.lifespan: list[str] = []
        self.cut: list[str] = []

    def reset(self) -> None:
        self.open.clear()
        self.cut.clear()

    async def await_open(self) -> None:
        await asyncio.to_thread(self.open.wait, HOLD_LIMIT)


def _ms(query: bytes | str) -> float:
    text = query.decode() if isinstance(query, bytes) else query
    return float(parse_qs(text).get("ms", ["0"])[0])


def make_asgi_app(gate: Gate) -> Any:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            gate.lifespan.append("startup")
            await complete_lifespan(receive, send)
            return
        if scope["type"] == "websocket":
            await receive()  # websocket.connect
            await send({"type": "websocket.accept"})
            while (message := await receive())["type"] == "websocket.receive":
                await send({"type": "websocket.send", "text": message.get("text")})
            return
        where = scope["path"]
        if where == "/raise":
            raise RuntimeError("the app failed")
        if where == "/slow":
            await asyncio.sleep(_ms(scope["query_string"]) / 1000)
        elif where == "/hold":
            await gate.await_open()
        status = 503 if where == "/unavailable" else 200
        start = {"type": "http.response.start", "status": status, "headers": []}
        if where == "/stream":
            await send(start)
            await _stream_until_disconnect(gate, receive, send)
            return
        await send(start)
        await send({"type": "http.response.body", "body": b"ok"})

    return app


async def _stream_until_disconnect(gate: Gate, receive: Any, send: Any) -> None:
    await receive()  # the request's (empty) body
    disconnected = asyncio.ensure_future(receive())  # what comes next is the end
    try:
        for _ in range(CHUNKS):
            await send({"type": "http.response.body", "body": b"x" * 1024, "more_body": True})
            done, _ = await asyncio.wait([disconnected], timeout=0.01)
            if done:
                gate.cut.append("asgi")
                return  # without the last body message: a response cut off
        await send({"type": "http.response.body", "body": b""})
    finally:
        disconnected.cancel()


def make_wsgi_app(gate: Gate) -> Any:
    def app(environ: dict[str, Any], start_response: Any) -> Any:
        where = environ["PATH_INFO"]
        if where == "/raise":
            raise RuntimeError("the app failed")
        if where == "/slow":
            time.sleep(_ms(environ.get("QUERY_STRING", "")) / 1000)
        elif where == "/hold":
            gate.open.wait(HOLD_LIMIT)
        status = "503 Service Unavailable" if where == "/unavailable" else "200 OK"
        start_response(status, [("Content-Type", "text/plain")])
        if where == "/stream":
            return _wsgi_stream(gate)
        return [b"ok"]

    return app


def _wsgi_stream(gate: Gate) -> Iterator[bytes]:
    sent = 0
    try:
        for sent in range(1, CHUNKS + 1):  # noqa: B007 - read in finally
            yield b"x" * 1024
            time.sleep(0.01)
    finally:
        if sent < CHUNKS:
            gate.cut.append("wsgi")


#: Django's views share one gate (a URLconf is a module).
DJANGO_GATE = Gate()


def fast(request: HttpRequest) -> HttpResponse:
    return HttpResponse(b"ok")


def slow(request: HttpRequest) -> HttpResponse:
    time.sleep(_ms(request.META.get("QUERY_STRING", "")) / 1000)
    return HttpResponse(b"ok")


def hold(request: HttpRequest) -> HttpResponse:
    DJANGO_GATE.open.wait(HOLD_LIMIT)
    return HttpResponse(b"ok")


async def ahold(request: HttpRequest) -> HttpResponse:
    await DJANGO_GATE.await_open()
    return HttpResponse(b"ok")


def fail(request: HttpRequest) -> HttpResponse:
    raise RuntimeError("the view failed")


def unavailable(request: HttpRequest) -> HttpResponse:
    return HttpResponse(b"busy", status=503)


def stream(request: HttpRequest) -> StreamingHttpResponse:
    return StreamingHttpResponse(iter([b"a", b"b", b"c"]))


urlpatterns = [
    path("fast", fast),
    path("slow", slow),
    path("hold", hold),
    path("ahold", ahold),
    path("raise", fail),
    path("unavailable", unavailable),
    path("stream", stream),
]
