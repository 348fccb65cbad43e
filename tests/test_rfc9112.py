"""Request framing as RFC 9110/9112 say, sent as raw bytes through every
front server: what the client got, and what the backend received.

The fronts: ``balancekit serve``'s lean server; the ASGI middleware under
uvicorn with balancekit's httptools protocol (what ``serve --server
uvicorn`` runs) and with h11; the WSGI middleware under werkzeug. Where a
front server itself refuses (or repairs) a request before the middleware
sees it, the test checks that outcome instead: the rule is that nothing
reaches a backend that the backend could read differently from balancekit.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httptools
import pytest

from balancekit.asgi import BalanceMiddleware
from balancekit.wsgi import BalanceMiddleware as WSGIBalanceMiddleware
from tests.upstreams import SocketServer, complete_lifespan

TRAILER_SMUGGLE = (
    b"POST /api/a HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"1\r\nZ\r\n0\r\nHost: evil.example\r\nCookie: session=attacker\r\n\r\n"
)


@dataclass
class Received:
    """One request as the backend read it off the wire."""

    head: bytes
    body: bytes

    @property
    def request_line(self) -> bytes:
        return self.head.split(b"\r\n", 1)[0]

    @property
    def fields(self) -> list[tuple[bytes, bytes]]:
        lines = self.head.split(b"\r\n")[1:]
        return [
            (name.strip().lower(), value.strip())
            for name, _, value in (line.partition(b":") for line in lines if line)
        ]

    def values(self, name: bytes) -> list[bytes]:
        return [value for key, value in self.fields if key == name]


class RecordingUpstream(SocketServer):
    """A backend that keeps every request's bytes and answers ``200 ok``.

    Bodies are read by Content-Length or chunked framing (trailers
    included, in ``body``), so a request reaches ``received`` exactly as
    it was sent upstream.
    """

    def __init__(self) -> None:
        self.received: list[Received] = []
        self.lock = threading.Lock()
        super().__init__()

    def handle(self, conn: socket.socket) -> None:
        buffer = b""
        stream = self.chunks(conn)
        while True:
            while b"\r\n\r\n" not in buffer:
                more = next(stream, None)
                if more is None:
                    return
                buffer += more
            head, _, buffer = buffer.partition(b"\r\n\r\n")
            seen = Received(head, b"")
            length = seen.values(b"content-length")
            if length:
                size = int(length[0])
            elif seen.values(b"transfer-encoding"):
                # The body ends at the blank line after the last chunk.
                while not re.search(rb"(^|\r\n)0\r\n(.*\r\n)?\r\n", buffer, re.S):
                    more = next(stream, None)
                    if more is None:
                        return
                    buffer += more
                size = re.search(rb"(^|\r\n)0\r\n(.*?\r\n)?\r\n", buffer, re.S).end()  # type: ignore[union-attr]
            else:
                size = 0
            while len(buffer) < size:
                more = next(stream, None)
                if more is None:
                    return
                buffer += more
            seen.body, buffer = buffer[:size], buffer[size:]
            with self.lock:
                self.received.append(seen)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")


@dataclass
class Answer:
    status: int
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""

    def values(self, name: bytes) -> list[bytes]:
        return [value for key, value in self.headers if key == name]


class _ResponseReader:
    def __init__(self) -> None:
        self.answer: Answer | None = None
        self.done = False
        self.parser = httptools.HttpResponseParser(self)

    def on_message_begin(self) -> None:
        self.answer = Answer(0)

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.answer is not None
        self.answer.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        assert self.answer is not None
        self.answer.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        assert self.answer is not None
        self.answer.body += body

    def on_message_complete(self) -> None:
        self.done = True


class Client:
    """One raw connection to a front server."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def answer(self) -> Answer:
        """The next response; the bytes after it stay for the next call."""
        reader = _ResponseReader()
        while not reader.done:
            data = self.sock.recv(65536)
            if not data:
                if reader.answer is not None and reader.answer.status:
                    return reader.answer  # a body delimited by the close
                raise AssertionError("connection closed before a response")
            reader.parser.feed_data(data)
        assert reader.answer is not None
        return reader.answer

    def closed(self, wait: float = 2.0) -> bool:
        """Whether the server closes the connection (within ``wait`` s)."""
        self.sock.settimeout(wait)
        try:
            return self.sock.recv(65536) == b""
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


def _not_found_asgi() -> Any:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await complete_lifespan(receive, send)
            return
        if scope["path"] == "/boom":
            raise RuntimeError("the app failed")
        await send({"type": "http.response.start", "status": 404, "headers": []})
        await send({"type": "http.response.body", "body": b"not found"})

    return app


def _not_found_wsgi(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    start_response("404 Not Found", [("Content-Length", "9")])
    return [b"not found"]


#: "lean-slow": the lean server with its fast path off (every request on
#: the coroutine path), so that both of its paths are held to the RFCs.
FRONTS = ["lean", "lean-slow", "uvicorn", "uvicorn-h11", "werkzeug"]


@pytest.fixture(scope="module")
def upstream() -> Iterator[RecordingUpstream]:
    server = RecordingUpstream()
    yield server
    server.close()


@pytest.fixture
def front(
    request: pytest.FixtureRequest, serve: Callable[..., Any], upstream: RecordingUpstream
) -> Iterator[tuple[str, int]]:
    """(front name, port) of a balancer with /api/ routed to ``upstream``."""
    kind, _, buffer = request.param.partition("+buffer=")
    config = {
        "pools": {
            "api": {
                "backends": [upstream.url],
                "retries": {"attempts": 1},
                "request_buffer": int(buffer or 0),
            }
        },
        "routes": [{"prefix": "/api/", "pool": "api"}],
    }
    if kind == "werkzeug":
        server = serve(WSGIBalanceMiddleware(_not_found_wsgi, config=config), wsgi=True)
    elif kind in ("lean", "lean-slow"):
        app = BalanceMiddleware(_not_found_asgi(), config=config)
        server = serve(app, lean=True, fast=kind == "lean")
    else:
        http = "h11" if kind == "uvicorn-h11" else "balancekit.uvicorn:HttpToolsProtocol"
        server = serve(BalanceMiddleware(_not_found_asgi(), config=config), http=http)
    with upstream.lock:
        upstream.received.clear()
    yield request.param, server.port


def fronts(*kinds: str) -> pytest.MarkDecorator:
    return pytest.mark.parametrize("front", kinds or FRONTS, indirect=True)


def _exchange(port: int, data: bytes) -> tuple[Answer, bool]:
    """The answer to ``data`` and whether the server then closed."""
    client = Client(port)
    try:
        client.send(data)
        answer = client.answer()
        return answer, client.closed(wait=0.5)
    finally:
        client.close()


# --- 1. trailers never become headers ------------------------------------------


@fronts("lean", "lean-slow", "uvicorn", "uvicorn-h11")
def test_request_trailers_never_reach_the_backend_as_headers(front, upstream) -> None:
    _, port = front
    answer, _ = _exchange(port, TRAILER_SMUGGLE)
    assert answer.status == 200
    (seen,) = upstream.received
    assert seen.values(b"cookie") == []
    assert seen.values(b"x-forwarded-host") == [b"a"]
    # The body went upstream without the trailer section (NGINX drops it).
    assert b"evil.example" not in seen.head + seen.body
    assert b"attacker" not in seen.head + seen.body


@fronts("werkzeug")
def test_werkzeug_trailers_never_reach_the_backend(front, upstream) -> None:
    _, port = front
    answer, _ = _exchange(port, TRAILER_SMUGGLE)
    # werkzeug reads a chunked body itself; whatever it answers, nothing of
    # the trailer section reaches the backend.
    assert answer.status in (200, 400, 411)
    for seen in upstream.received:
        assert b"evil.example" not in seen.head + seen.body
        assert b"attacker" not in seen.head + seen.body


def test_the_plain_uvicorn_httptools_protocol_merges_trailers(serve, upstream) -> None:
    """Why balancekit ships its own uvicorn protocol: uvicorn's own adds a
    request's trailers to ``scope["headers"]``. When this test fails,
    uvicorn fixed it and ``balancekit.uvicorn`` can go."""
    config = {
        "pools": {"api": {"backends": [upstream.url]}},
        "routes": [{"prefix": "/api/", "pool": "api"}],
    }
    server = serve(BalanceMiddleware(_not_found_asgi(), config=config), http="httptools")
    upstream.received.clear()
    # (TRAILER_SMUGGLE's second Host is refused by the middleware's own check.)
    cookie_only = TRAILER_SMUGGLE.replace(b"Host: evil.example\r\n", b"")
    answer, _ = _exchange(server.port, cookie_only)
    assert answer.status == 200
    assert upstream.received[0].values(b"cookie") == [b"session=attacker"]


# --- 2. exactly one Host --------------------------------------------------------


@fronts()
def test_two_host_fields_are_refused(front, upstream) -> None:
    _, port = front
    answer, _ = _exchange(port, b"GET /api/a HTTP/1.1\r\nHost: a\r\nHost: evil.example\r\n\r\n")
    assert answer.status == 400
    assert upstream.received == []


@fronts()
def test_http11_without_host_is_refused(front, upstream) -> None:
    _, port = front
    answer, _ = _exchange(port, b"GET /api/a HTTP/1.1\r\n\r\n")
    assert answer.status == 400
    assert upstream.received == []


@fronts("lean", "lean-slow", "uvicorn", "uvicorn-h11")
def test_http10_without_host_is_served(front, upstream) -> None:
    _, port = front
    answer, _ = _exchange(port, b"GET /api/a HTTP/1.0\r\n\r\n")
    assert answer.status == 200
    (seen,) = upstream.received
    assert seen.values(b"host") == [upstream.url.removeprefix("http://").encode()]


# --- 3. HTTP/1.0 framing and keep-alive -----------------------------------------


@fronts()
def test_http10_with_transfer_encoding_is_refused_and_closed(front, upstream) -> None:
    _, port = front
    answer, closed = _exchange(
        port, b"POST /api/a HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    )
    assert answer.status == 400
    assert closed
    assert upstream.received == []


@fronts("lean", "lean-slow", "uvicorn", "uvicorn-h11", "werkzeug")
def test_http10_keep_alive_is_said_or_the_connection_closes(front, upstream) -> None:
    _, port = front
    client = Client(port)
    try:
        request = b"GET /api/a HTTP/1.0\r\nHost: a\r\nConnection: keep-alive\r\n\r\n"
        client.send(request)
        answer = client.answer()
        assert answer.status == 200
        if answer.values(b"connection") == [b"keep-alive"]:
            assert answer.values(b"content-length") == [b"2"]
            client.send(request)  # the connection really is kept
            assert client.answer().status == 200
        else:
            assert client.closed(), "neither Connection: keep-alive nor a close"
    finally:
        client.close()


@fronts("lean", "lean-slow")
def test_lean_server_keeps_http10_alive_when_asked(front, upstream) -> None:
    _, port = front
    client = Client(port)
    try:
        for _ in range(3):
            client.send(b"GET /api/a HTTP/1.0\r\nHost: a\r\nConnection: keep-alive\r\n\r\n")
            answer = client.answer()
            assert answer.values(b"connection") == [b"keep-alive"]
        client.send(b"GET /api/a HTTP/1.0\r\nHost: a\r\n\r\n")  # no keep-alive: closed
        assert client.answer().values(b"connection") == [b"close"]
        assert client.closed()
    finally:
        client.close()


# --- 4. Content-Length with whitespace around it ----------------------------------


@fronts()
def test_content_length_with_whitespace_is_accepted(front, upstream) -> None:
    _, port = front
    answer, _ = _exchange(
        port, b"POST /api/a HTTP/1.1\r\nHost: a\r\nContent-Length: 5 \r\n\r\nhello"
    )
    assert answer.status == 200
    (seen,) = upstream.received
    assert seen.body == b"hello"
    assert [v.strip() for v in seen.values(b"content-length")] == [b"5"]


# --- 5. the lean server's own answers and request-line versions --------------------


def _own_answer(answer: Answer, status: int) -> None:
    assert answer.status == status
    assert len(answer.values(b"date")) == 1
    assert answer.values(b"connection") == [b"close"]
    assert answer.values(b"content-type") == [b"application/problem+json"]


@fronts("lean", "lean-slow")
@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"GET /api/a HTTP/1.1\r\nHost: a\r\nContent-Length: x\r\n\r\n", 400),
        (b"GET /api/a HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
        (b"GET /api/a HTTP/1.1\r\nHost: a\r\nX: " + b"y" * 70_000 + b"\r\n\r\n", 431),
        (b"GET /api/a\r\n\r\n", 400),
        (b"GET /api/a HTTP/0.9\r\n\r\n", 400),
        (b"GET /api/a HTTP/2.0\r\nHost: a\r\n\r\n", 505),
        (b"GET /boom HTTP/1.1\r\nHost: a\r\n\r\n", 500),
    ],
    ids=["bad-length", "two-hosts", "head-too-large", "no-version", "http09", "http2", "app-error"],
)
def test_lean_server_answers_carry_date_and_one_connection_close(
    front, upstream, data: bytes, status: int
) -> None:
    _, port = front
    answer, closed = _exchange(port, data)
    _own_answer(answer, status)
    assert closed
    assert upstream.received == []


@fronts("lean", "lean-slow")
def test_lean_server_times_out_a_started_head_with_408(front, monkeypatch) -> None:
    import balancekit._server

    monkeypatch.setattr(balancekit._server, "HEAD_TIMEOUT", 0.5)
    _, port = front
    client = Client(port)
    try:
        client.send(b"GET /api/a HTTP/1.1\r\nHost: a\r\n")  # and no more
        _own_answer(client.answer(), 408)
        assert client.closed()
    finally:
        client.close()


@fronts("lean", "lean-slow", "uvicorn", "uvicorn-h11")
def test_later_http1_minor_versions_are_served_as_http11(front, upstream) -> None:
    kind, port = front
    answer, _ = _exchange(port, b"GET /api/a HTTP/1.2\r\nHost: a\r\n\r\n")
    if not kind.startswith("lean"):
        # uvicorn's parsers refuse HTTP/1.2 (400) themselves: nothing forwarded.
        assert answer.status in (200, 400)
        assert len(upstream.received) == (answer.status == 200)
        return
    assert answer.status == 200
    (seen,) = upstream.received
    assert seen.request_line == b"GET /api/a HTTP/1.1"


# --- 6. request_buffer: a slow body holds no backend --------------------------------


@fronts("lean+buffer=1024", "uvicorn+buffer=1024", "werkzeug+buffer=1024", "lean", "werkzeug")
def test_a_buffered_body_is_read_whole_before_a_backend_is_picked(front, upstream) -> None:
    kind, port = front
    buffered = "+buffer=" in kind
    connections = len(upstream._threads)
    client = Client(port)
    try:
        client.send(b"POST /api/a HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nhello")
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline and len(upstream._threads) == connections:
            time.sleep(0.02)
        # Buffered: half a body opens no upstream connection; streamed, it does.
        assert (len(upstream._threads) == connections) is buffered
        client.send(b"world")
        assert client.answer().status == 200
    finally:
        client.close()
    assert upstream.received[-1].body == b"helloworld"


def test_a_buffered_body_is_retried_on_another_backend(serve, upstream) -> None:
    from tests.upstreams import RawServer

    failing = RawServer("reset")
    try:
        config = {
            "pools": {
                "api": {
                    "backends": [failing.url, upstream.url],
                    "algorithm": "round_robin",
                    "request_buffer": 1024,
                }
            },
            "routes": [{"prefix": "/api/", "pool": "api"}],
        }
        server = serve(BalanceMiddleware(_not_found_asgi(), config=config), lean=True)
        upstream.received.clear()
        for _ in range(2):  # one of the two goes to the failing backend first
            answer, _ = _exchange(
                server.port, b"PUT /api/a HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello"
            )
            assert answer.status == 200
        assert failing.requests == 1
        assert [seen.body for seen in upstream.received] == [b"hello", b"hello"]
    finally:
        failing.close()


def test_a_chunked_body_a_wsgi_server_cannot_end_is_411(upstream) -> None:
    """A WSGI server without wsgi.input_terminated hands over a chunked body
    it cannot end: the answer asks for a length (it raised KeyError once)."""
    import io

    config = {
        "pools": {"api": {"backends": [upstream.url]}},
        "routes": [{"prefix": "/api/", "pool": "api"}],
    }
    app = WSGIBalanceMiddleware(_not_found_wsgi, config=config)
    started: list[str] = []
    upstream.received.clear()
    environ = {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": "/api/a",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "HTTP_HOST": "a",
        "HTTP_TRANSFER_ENCODING": "chunked",
        "wsgi.input": io.BytesIO(b"5\r\nhello\r\n0\r\n\r\n"),
        "wsgi.url_scheme": "http",
        "REMOTE_ADDR": "127.0.0.1",
    }
    try:
        body = b"".join(app(environ, lambda status, headers: started.append(status)))
    finally:
        app.balancer.close()
    assert started == ["411 Length Required"]
    assert b'"title": "Length Required"' in body
    assert upstream.received == []
