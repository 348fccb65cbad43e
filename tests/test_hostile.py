"""Hostile clients and misbehaving upstreams, over raw sockets.

Every hostile request is answered 4xx (or the connection is closed), nothing
smuggled ever reaches an upstream, and the same server goes on proxying.
Every broken upstream is a 502 problem (or a visibly cut response), the
same on every engine, with the pool's counters settled afterwards.
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Callable, Iterator
from typing import IO, Any

import pytest

from balancekit import Balancer
from balancekit._types import Message
from balancekit.asgi import BalanceMiddleware
from tests.conftest import ENGINES, ServerThread, asgi_only
from tests.helpers import app_fallback, balanced
from tests.upstreams import ScriptedUpstream, make_echo_app

QUIET = 1.0  # seconds of silence after which a reply is taken as complete
SMUGGLED = b"GET /api/smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
HEAD = b"POST /api/x HTTP/1.1\r\nHost: x\r\n"


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest) -> str:
    """Here every test runs on the WSGI engine too."""
    return str(request.param)


# --- fixtures -----------------------------------------------------------------------


@pytest.fixture(
    params=["aiohttp", "lean", "lean-slow"], ids=["uvicorn", "lean-server", "lean-server-slow"]
)
def front(request: pytest.FixtureRequest) -> str:
    """What faces the hostile client: uvicorn, or ``balancekit serve``'s own
    server, with its fast path and without (every request on coroutines)."""
    return str(request.param)


class Starter:
    """``serve``, but every server started here is told to exit at once when
    the test ends, so that ``serve`` joins them together, not one by one."""

    def __init__(self, serve: Callable[..., ServerThread]) -> None:
        self.serve = serve
        self.started: list[ServerThread] = []

    def __call__(self, app: Any, **options: Any) -> ServerThread:
        return self.adopt(self.serve(app, **options))

    def adopt(self, server: ServerThread) -> ServerThread:
        self.started.append(server)
        return server

    def stop_all(self) -> None:
        for server in self.started:
            server.request_exit()


@pytest.fixture
def start(serve) -> Iterator[Starter]:
    starter = Starter(serve)
    yield starter
    starter.stop_all()


@pytest.fixture
def echo(start: Starter) -> ServerThread:
    """One echo upstream, "a": the whole pool, so its ``seen`` is all upstreams'."""
    return start(make_echo_app("a"))


# --- helpers ------------------------------------------------------------------------


def exchange(port: int, raw: bytes, *, quiet: float = QUIET) -> tuple[bytes, bool]:
    """Send ``raw``; read until the server closes (True) or goes quiet (False)."""
    reply = b""
    closed = False
    with socket.create_connection(("127.0.0.1", port), timeout=quiet) as sock:
        with contextlib.suppress(OSError):  # the server may refuse before reading it all
            sock.sendall(raw)
        try:
            while chunk := sock.recv(65536):
                reply += chunk
            closed = True
        except TimeoutError:
            pass
        except ConnectionResetError:
            closed = True
    return reply, closed


def status_of(reply: bytes) -> int | None:
    if not reply.startswith(b"HTTP/1.1 "):
        return None
    return int(reply[9:12])


def split(reply: bytes) -> tuple[dict[str, str], bytes]:
    head, _, body = reply.partition(b"\r\n\r\n")
    headers: dict[str, str] = {}
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
    if headers.get("transfer-encoding") == "chunked":
        body = dechunk(body)
    return headers, body


def dechunk(data: bytes) -> bytes:
    """A chunked body's content; what a cut one holds up to the cut."""
    out = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += data[:size]
        data = data[size + 2 :]
    return out


def read_response(reader: IO[bytes]) -> tuple[int, dict[str, str], bytes]:
    """One response from a keep-alive connection: Content-Length or chunked."""
    status_line = reader.readline()
    assert status_line.startswith(b"HTTP/1.1 "), status_line
    headers: dict[str, str] = {}
    while (line := reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding") == "chunked":
        body = b""
        while size := int(reader.readline().split(b";")[0], 16):
            body += reader.read(size)
            reader.readline()
        reader.readline()
    else:
        body = reader.read(int(headers.get("content-length", "0")))
    return int(status_line[9:12]), headers, body


def seen(upstreams) -> list[str]:
    return [path for upstream in upstreams for path in upstream.app.seen]


def get(port: int, path: bytes = b"/api/x") -> bytes:
    reply, closed = exchange(
        port, b"GET " + path + b" HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n", quiet=5
    )
    assert closed, reply
    return reply


def assert_alive(server, path: bytes = b"/api/x") -> bytes:
    reply = get(server.port, path)
    assert status_of(reply) == 200, reply[:300]
    return reply


def assert_settled(balancer) -> None:
    pool = balancer.pools["api"]
    deadline = time.monotonic() + 2
    while pool.active_requests and time.monotonic() < deadline:
        time.sleep(0.02)
    assert pool.active_requests == 0


def assert_refused(reply: bytes, closed: bool) -> None:
    status = status_of(reply)
    if status is None:
        assert closed and reply == b"", f"no HTTP answer and not closed: {reply[:200]!r}"
    else:
        assert 400 <= status < 500, reply[:300]
        assert reply.count(b"HTTP/1.") == 1, f"more than one answer: {reply!r}"


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


# --- hostile requests ---------------------------------------------------------------

HOSTILE = [
    # header block size and count
    pytest.param(
        b"GET /api/x HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n",
        id="header-value-100kb",
    ),
    pytest.param(
        b"GET /api/x HTTP/1.1\r\nHost: x\r\nX-" + b"n" * 100_000 + b": 1\r\n\r\n",
        id="header-name-100kb",
    ),
    pytest.param(
        b"GET /api/x HTTP/1.1\r\nHost: x\r\n"
        + b"".join(b"X-H%d: v\r\n" % i for i in range(1000))
        + b"\r\n",
        id="1000-headers",
    ),
    pytest.param(
        b"GET /api/x HTTP/1.1\r\nHost: x\r\n"
        + b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 1000) for i in range(80))
        + b"\r\n",
        id="80-headers-of-1kb",
    ),
    # control characters and folding in header values
    pytest.param(b"GET /api/x HTTP/1.1\r\nHost: x\r\nX-A: a\rb\r\n\r\n", id="bare-cr"),
    pytest.param(b"GET /api/x HTTP/1.1\r\nHost: x\r\nX-A: a\nb\r\n\r\n", id="bare-lf"),
    pytest.param(b"GET /api/x HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n", id="nul"),
    pytest.param(
        b"GET /api/x HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n",
        id="obs-fold",
    ),
    pytest.param(
        HEAD + b"Content-Length: 5\r\n Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
        id="obs-fold-hides-te",
    ),
    pytest.param(
        HEAD + b"Transfer-Encoding : chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n" + SMUGGLED,
        id="space-before-colon",
    ),
    # Content-Length
    pytest.param(HEAD + b"Content-Length: -5\r\n\r\nhello" + SMUGGLED, id="cl-negative"),
    pytest.param(HEAD + b"Content-Length: abc\r\n\r\nhello" + SMUGGLED, id="cl-text"),
    pytest.param(HEAD + b"Content-Length: +5\r\n\r\nhello" + SMUGGLED, id="cl-plus"),
    pytest.param(HEAD + b"Content-Length: 0x5\r\n\r\nhello" + SMUGGLED, id="cl-hex"),
    pytest.param(HEAD + b"Content-Length: 5, 6\r\n\r\nhello" + SMUGGLED, id="cl-list"),
    pytest.param(HEAD + b"Content-Length: 99999999999999999999999\r\n\r\nhello", id="cl-overflow"),
    pytest.param(
        HEAD + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!" + SMUGGLED,
        id="cl-two-values",
    ),
    # CL.TE: a front end reading Content-Length takes it all as body; a back end
    # reading chunked stops at the empty chunk and serves SMUGGLED.
    pytest.param(
        HEAD
        + b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n" % (5 + len(SMUGGLED))
        + b"0\r\n\r\n"
        + SMUGGLED,
        id="cl-te",
    ),
    # TE.CL: a front end reading chunked takes it all; a back end reading
    # Content-Length: 4 stops after the chunk size and serves SMUGGLED.
    pytest.param(
        HEAD
        + b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n"
        + chunk(SMUGGLED)
        + b"0\r\n\r\n",
        id="te-cl",
    ),
    pytest.param(
        HEAD
        + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n"
        + b"Content-Length: %d\r\n\r\n" % (5 + len(SMUGGLED))
        + b"0\r\n\r\n"
        + SMUGGLED,
        id="te-te-cl",
    ),
    # Transfer-Encoding values
    pytest.param(
        HEAD + b"Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n" + SMUGGLED,
        id="te-chunked-identity",
    ),
    pytest.param(
        HEAD + b"Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n" + SMUGGLED, id="te-xchunked"
    ),
    pytest.param(
        HEAD + b"Transfer-Encoding: identity\r\n\r\n0\r\n\r\n" + SMUGGLED, id="te-identity"
    ),
    pytest.param(
        HEAD
        + b"Transfer-Encoding:  chunked\r\nContent-Length: %d\r\n\r\n" % (5 + len(SMUGGLED))
        + b"0\r\n\r\n"
        + SMUGGLED,
        id="te-leading-space-with-cl",
    ),
    pytest.param(
        HEAD
        + b"Transfer-Encoding:\tchunked\r\nContent-Length: %d\r\n\r\n" % (5 + len(SMUGGLED))
        + b"0\r\n\r\n"
        + SMUGGLED,
        id="te-tab-with-cl",
    ),
    pytest.param(
        HEAD
        + b"Transfer-Encoding: chunked\x0b\r\nContent-Length: %d\r\n\r\n" % (5 + len(SMUGGLED))
        + b"0\r\n\r\n"
        + SMUGGLED,
        id="te-vtab-with-cl",
    ),
    pytest.param(
        HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + b"f" * 40 + b"\r\nx\r\n0\r\n\r\n" + SMUGGLED,
        id="chunk-size-overflow",
    ),
    pytest.param(
        HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + b"zz\r\nx\r\n0\r\n\r\n" + SMUGGLED,
        id="chunk-size-not-hex",
    ),
]


@pytest.mark.parametrize("raw", HOSTILE)
def test_hostile_request_is_refused_and_nothing_reaches_an_upstream(
    start, echo, front, raw: bytes
) -> None:
    server, balancer = balanced(start, [echo.url], engine=front)
    reply, closed = exchange(server.port, raw)
    assert_refused(reply, closed)
    assert b"127.0.0.1" not in reply
    assert echo.app.seen == []  # neither the request nor anything smuggled in it
    assert_settled(balancer)
    assert_alive(server)
    assert echo.app.seen == ["/api/x"]


@pytest.mark.parametrize(
    "te",
    [
        pytest.param(b"chunked", id="chunked"),
        pytest.param(b" chunked", id="leading-space"),
        pytest.param(b"Chunked", id="capital"),
    ],
)
def test_a_valid_chunked_body_is_one_request_and_its_content_stays_body(
    start, echo, front, te: bytes
) -> None:
    # SMUGGLED travels inside a chunk: it is body, and must arrive as body.
    server, balancer = balanced(start, [echo.url], engine=front)
    body = chunk(SMUGGLED) + b"0\r\n\r\n"
    reply, closed = exchange(
        server.port,
        HEAD + b"Connection: close\r\nTransfer-Encoding:" + te + b"\r\n\r\n" + body,
    )
    status = status_of(reply)
    assert closed
    if status != 200:
        assert_refused(reply, closed)
        assert echo.app.seen == []
    else:
        echoed = json.loads(split(reply)[1])
        assert echoed["body_size"] == len(SMUGGLED)
        assert echo.app.seen == ["/api/x"]
    assert_settled(balancer)
    assert_alive(server)
    assert "/api/smuggled" not in echo.app.seen


# uvicorn's parser refuses all of the above before the app sees them; a more
# lenient server might not. The middleware must refuse them itself.


@pytest.mark.parametrize(
    "framing",
    [
        pytest.param([(b"content-length", b"41"), (b"transfer-encoding", b"chunked")], id="cl-te"),
        pytest.param([(b"transfer-encoding", b"chunked"), (b"content-length", b"4")], id="te-cl"),
        pytest.param([(b"content-length", b"5"), (b"content-length", b"6")], id="two-cl"),
        pytest.param([(b"content-length", b"-5")], id="negative-cl"),
        pytest.param([(b"content-length", b"abc")], id="text-cl"),
        pytest.param([(b"content-length", b"5, 5")], id="cl-list"),
    ],
)
async def test_ambiguous_framing_from_a_lenient_server_is_refused_by_the_middleware(
    echo, framing: list[tuple[bytes, bytes]]
) -> None:
    balancer = Balancer(
        {"pools": {"api": {"backends": [echo.url]}}, "routes": [{"prefix": "/api/", "pool": "api"}]}
    )
    app = BalanceMiddleware(app_fallback, balancer=balancer)
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"0\r\n\r\n" + SMUGGLED, "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/api/x",
        "raw_path": b"/api/x",
        "query_string": b"",
        "headers": [(b"host", b"x"), *framing],
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 80),
    }
    try:
        await app(scope, receive, send)
    finally:
        await balancer.aclose()
    assert sent[0]["type"] == "http.response.start"
    assert sent[0]["status"] == 400
    assert echo.app.seen == []


# --- request targets ----------------------------------------------------------------


def test_absolute_form_target_is_refused_or_stays_on_our_backends(start, upstreams) -> None:
    for upstream in upstreams:
        start.adopt(upstream)
    server, balancer = balanced(start, [u.url for u in upstreams])
    reply, closed = exchange(
        server.port,
        b"GET http://evil.example/api/x HTTP/1.1\r\nHost: evil.example\r\n"
        b"Connection: close\r\n\r\n",
    )
    assert closed
    status = status_of(reply)
    if status == 200:
        echoed = json.loads(split(reply)[1])
        assert echoed["backend"] in {"a", "b", "c"}
        assert echoed["path"] == "/api/x"
        port = {"a": upstreams[0], "b": upstreams[1], "c": upstreams[2]}[echoed["backend"]].port
        assert dict(echoed["headers"])["host"] == f"127.0.0.1:{port}"
        assert seen(upstreams) == ["/api/x"]
    else:
        assert_refused(reply, closed)
        assert seen(upstreams) == []
    assert_settled(balancer)
    assert_alive(server)


@pytest.mark.parametrize(
    "request_line",
    [
        pytest.param(b"GET http://evil.example/ HTTP/1.1", id="absolute-unrouted"),
        pytest.param(b"GET http://evil.example/api/../../x HTTP/1.1", id="absolute-climbing"),
        pytest.param(b"GET http://evil.example HTTP/1.1", id="absolute-no-path"),
        pytest.param(b"CONNECT evil.example:443 HTTP/1.1", id="authority-form"),
        pytest.param(b"OPTIONS * HTTP/1.1", id="asterisk-form"),
    ],
)
def test_other_target_forms_never_reach_an_upstream(
    start, echo, front, request_line: bytes
) -> None:
    server, _ = balanced(start, [echo.url], engine=front)
    reply, _ = exchange(
        server.port, request_line + b"\r\nHost: evil.example\r\nConnection: close\r\n\r\n"
    )
    status = status_of(reply)
    # refused, or answered by the wrapped app: never proxied
    assert status is None or status < 500, reply[:300]
    assert echo.app.seen == []
    assert_alive(server)


@pytest.mark.parametrize(
    "path",
    [
        pytest.param(b"/api/../../etc/passwd", id="climb"),
        pytest.param(b"/../api/x", id="climb-first"),
        pytest.param(b"/api/./../../x", id="climb-with-dot"),
        pytest.param(b"/api/%2e%2e/%2e%2e/x", id="encoded-dots"),
        pytest.param(b"/api/%2E%2E/%2E%2E/x", id="encoded-dots-upper"),
        pytest.param(b"/api/.%2e/.%2e/x", id="half-encoded-dots"),
        pytest.param(b"/api/..%2f..%2fx", id="encoded-slash"),
        pytest.param(b"/api/..%2F..%2Fx", id="encoded-slash-upper"),
        pytest.param(b"/api/%2e%2e%2f%2e%2e%2fx", id="all-encoded"),
        pytest.param(b"/api/..%2fx", id="encoded-slash-one-level"),
    ],
)
def test_paths_above_the_root_are_400_and_never_forwarded(start, echo, front, path: bytes) -> None:
    server, balancer = balanced(start, [echo.url], engine=front)
    reply = get(server.port, path)
    assert status_of(reply) == 400, reply[:300]
    headers, _ = split(reply)
    assert headers["content-type"] == "application/problem+json"
    assert echo.app.seen == []
    assert_settled(balancer)
    assert_alive(server)
    assert echo.app.seen == ["/api/x"]


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        pytest.param(b"/api/a/../b", "/api/b", id="dotdot"),
        pytest.param(b"/api/./a/./b", "/api/a/b", id="dot"),
        pytest.param(b"/api/a/%2e%2e/b", "/api/b", id="encoded-dotdot"),
    ],
)
def test_dot_segments_inside_the_root_are_resolved_before_forwarding(
    start, echo, front, path: bytes, expected: str
) -> None:
    server, _ = balanced(start, [echo.url], engine=front)
    reply = assert_alive(server, path)
    echoed = json.loads(split(reply)[1])
    assert (echoed["path"], echoed["raw_path"]) == (expected, expected)
    assert echo.app.seen == [expected]


def test_dot_segments_cannot_leave_the_route(start, echo, front) -> None:
    # /api/../x resolves to /x: the wrapped app's, never the pool's
    server, _ = balanced(start, [echo.url], engine=front)
    reply = get(server.port, b"/api/../x")
    assert status_of(reply) == 200
    assert split(reply)[1] == b"app"
    assert echo.app.seen == []


# --- misbehaving upstreams ----------------------------------------------------------


def balanced_bad_first(serve, bad, good, engine: str, **pool: Any):
    """The bad backend first in line (no retry), the good one behind it."""
    return balanced(
        serve,
        [bad.url, good.url],
        engine=engine,
        pool={"algorithm": "first", "retries": {"attempts": 1}, **pool},
    )


@pytest.mark.parametrize("mode", ["garbage", "reset", "close"])
def test_a_broken_upstream_is_a_502_problem_naming_only_the_pool(
    start, echo, raw_server, engine, mode: str
) -> None:
    bad = raw_server(mode)
    server, balancer = balanced_bad_first(start, bad, echo, engine)
    for request in (
        b"GET /api/x HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
        b"POST /api/x HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nConnection: close\r\n\r\nbody",
    ):
        reply, closed = exchange(server.port, request, quiet=5)
        assert closed
        assert status_of(reply) == 502, reply[:300]
        headers, body = split(reply)
        assert headers["content-type"] == "application/problem+json"
        problem = json.loads(body)
        assert problem["status"] == 502
        assert problem["pool"] == "api"
        assert "127.0.0.1" not in body.decode() and str(bad.port) not in body.decode()
        assert b"NOT HTTP" not in reply  # the upstream's bytes are not reflected
    assert bad.requests == 2
    assert_settled(balancer)
    balancer.pools["api"].disable(bad.url)
    assert json.loads(split(assert_alive(server))[1])["backend"] == "a"
    assert_settled(balancer)


def test_a_truncated_upstream_response_is_cut_for_the_client_too(
    start, echo, raw_server, engine
) -> None:
    bad = raw_server("truncated")
    server, balancer = balanced_bad_first(start, bad, echo, engine)
    reply, closed = exchange(
        server.port, b"GET /api/x HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n", quiet=5
    )
    assert closed, "the client must see the connection closed, not wait for the rest"
    headers, body = split(reply)
    assert len(body) < 1000
    if status_of(reply) == 200:
        # never a complete-looking response: a length it does not reach, or
        # a chunked body without its last chunk
        if "content-length" in headers:
            assert int(headers["content-length"]) > len(body)
        else:
            assert headers.get("transfer-encoding") == "chunked"
            assert not reply.endswith(b"\r\n0\r\n\r\n")
    else:
        assert status_of(reply) is None or status_of(reply) == 502
    assert_settled(balancer)
    balancer.pools["api"].disable(bad.url)
    assert json.loads(split(assert_alive(server))[1])["backend"] == "a"


def test_after_a_garbage_answer_the_pool_goes_on_serving_over_one_client_connection(
    start, echo, raw_server, engine
) -> None:
    asgi_only(engine, "werkzeug closes every client connection after one response")
    bad = raw_server("garbage")
    server, balancer = balanced(
        start,
        [bad.url, echo.url],
        engine=engine,
        pool={"retries": {"attempts": 1}},
    )
    request = b"GET /api/x HTTP/1.1\r\nHost: t\r\n\r\n"
    statuses: list[int] = []
    backends: list[str] = []
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    with sock, sock.makefile("rb") as reader:
        for _ in range(6):
            sock.sendall(request)
            status, headers, body = read_response(reader)
            statuses.append(status)
            if status == 200:
                backends.append(json.loads(body)["backend"])
            else:
                assert json.loads(body)["pool"] == "api"
            assert headers.get("connection") != "close", "the client connection survives"
    # round robin: the garbage backend and the healthy one take turns
    assert sorted(statuses) == [200, 200, 200, 502, 502, 502], statuses
    assert backends == ["a", "a", "a"]
    assert bad.requests == 3
    assert_settled(balancer)


def test_a_garbage_answer_to_a_get_is_retried_on_the_healthy_backend(
    start, echo, raw_server, engine
) -> None:
    bad = raw_server("garbage")
    server, balancer = balanced(start, [bad.url, echo.url], engine=engine)
    for _ in range(4):
        reply = assert_alive(server)
        assert json.loads(split(reply)[1])["backend"] == "a"
    assert bad.requests >= 1
    assert_settled(balancer)


# --- upstreams that answer what no HTTP server should ---------------------------------


@pytest.fixture
def scripted() -> Iterator[Callable[..., ScriptedUpstream]]:
    made: list[ScriptedUpstream] = []

    def make(response: bytes, *, keep_open: bool = False) -> ScriptedUpstream:
        made.append(ScriptedUpstream(response, keep_open=keep_open))
        return made[-1]

    yield make
    for upstream in made:
        upstream.close()


def assert_502_problem(reply: bytes, upstream_port: int) -> None:
    assert status_of(reply) == 502, reply[:400]
    headers, body = split(reply)
    assert headers["content-type"] == "application/problem+json"
    problem = json.loads(body)
    assert (problem["status"], problem["pool"]) == (502, "api")
    assert "127.0.0.1" not in body.decode() and str(upstream_port) not in body.decode()


def upstream_port(upstream: Any) -> int:
    return int(upstream.url.rsplit(":", 1)[1])


MALFORMED = [
    # (response, the relayed body that would also be acceptable, or None: 502 only)
    pytest.param(
        b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\n\r\n",
        b"hello",
        id="cl-and-te",
    ),
    pytest.param(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 2\r\n\r\n"
        b"5\r\nhello\r\n0\r\n\r\n",
        b"hello",
        id="te-and-short-cl",
    ),
    pytest.param(
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\nhello!!",
        None,
        id="two-content-lengths",
    ),
    pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\nhello", None, id="negative-cl"),
    pytest.param(
        b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 5\r\n\r\nhello", None, id="nul"
    ),
    pytest.param(b"HTTP/1.1 20 OK\r\nContent-Length: 5\r\n\r\nhello", None, id="status-2-digits"),
    pytest.param(b"HTTP/1.1 999 Odd\r\nContent-Length: 5\r\n\r\nhello", None, id="status-999"),
    pytest.param(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
        b"raw bytes of another protocol",
        None,
        id="unsolicited-101",
    ),
]


@pytest.mark.parametrize(("response", "acceptable"), MALFORMED)
def test_a_malformed_upstream_response_is_a_502_on_every_transport(
    start, echo, scripted, engine, response: bytes, acceptable: bytes | None
) -> None:
    bad = scripted(response)
    server, balancer = balanced_bad_first(start, bad, echo, engine)
    reply, closed = exchange(
        server.port, b"GET /api/x HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n", quiet=5
    )
    assert closed
    if acceptable is not None and status_of(reply) == 200:
        # relayed instead: then framed as what the client gets (RFC 9112
        # section 6.3: Transfer-Encoding overrides, Content-Length removed)
        headers, body = split(reply)
        assert "content-length" not in headers or int(headers["content-length"]) == len(body), reply
        assert body == acceptable, reply
    else:
        assert_502_problem(reply, upstream_port(bad))
    assert bad.requests == 1
    assert_settled(balancer)
    balancer.pools["api"].disable(bad.url)
    assert json.loads(split(assert_alive(server))[1])["backend"] == "a"


def test_extra_bytes_from_an_upstream_never_answer_the_next_request(
    start, scripted, engine
) -> None:
    # One response, then a second nobody asked for, on a kept-alive
    # connection: reusing that connection would hand the stale response to
    # the next request (response queue poisoning, across clients).
    extra = b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\nX-Poison: 1\r\n\r\npoisoned"
    upstream = scripted(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok" + extra, keep_open=True)
    server, balancer = balanced(start, [upstream.url], engine=engine)
    for _ in range(4):
        reply = get(server.port)
        assert b"poisoned" not in reply and b"x-poison" not in reply.lower(), reply
        if status_of(reply) != 502:
            assert status_of(reply) == 200 and split(reply)[1] == b"ok", reply
    assert upstream.requests == 4
    assert_settled(balancer)


# --- bytes that are not UTF-8 ---------------------------------------------------------


def test_an_unrouted_path_that_is_not_utf8_reaches_the_app_untouched(start, echo, front) -> None:
    # CONTRACT section 2: requests that match no route go to the wrapped
    # application untouched; only routed ones are the balancer's business.
    server, _ = balanced(start, [echo.url], engine=front)
    reply = get(server.port, b"/files/%ff%fe")
    assert status_of(reply) == 200, reply[:400]
    assert split(reply)[1] == b"app"
    assert echo.app.seen == []


@pytest.mark.parametrize(
    "path",
    [
        pytest.param(b"/api/%ff", id="invalid-utf8"),
        pytest.param(b"/api/%c0%ae%c0%ae/%c0%ae%c0%ae/x", id="overlong-dots"),
    ],
)
def test_a_routed_path_that_is_not_utf8_is_refused_or_forwarded_as_sent(
    start, echo, front, path: bytes
) -> None:
    # overlong UTF-8 dots are dots to some backends: if forwarded at all,
    # the bytes go upstream exactly as sent, never decoded into "..".
    server, balancer = balanced(start, [echo.url], engine=front)
    reply = get(server.port, path)
    status = status_of(reply)
    if status == 200:
        assert json.loads(split(reply)[1])["raw_path"] == path.decode()
    else:
        assert status == 400, reply[:400]
        assert echo.app.seen == []
    assert_settled(balancer)
    assert_alive(server)
