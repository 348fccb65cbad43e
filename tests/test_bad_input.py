"""Hostile requests and misbehaving upstreams: a 4xx or a 502, never a crash,
never a smuggled request, never a leaked connection."""

from __future__ import annotations

import contextlib
import socket
import time

import httpx
import pytest

from tests.helpers import balanced


def exchange(port: int, raw: bytes, *, timeout: float = 3.0) -> bytes:
    """Send raw bytes, read until the server closes or goes quiet."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        with contextlib.suppress(OSError):  # the server may refuse before reading all
            sock.sendall(raw)
        reply = b""
        try:
            while chunk := sock.recv(65536):
                reply += chunk
        except (TimeoutError, ConnectionResetError):
            pass
    return reply


def status_of(reply: bytes) -> int | None:
    if not reply.startswith(b"HTTP/1.1 "):
        return None  # the server closed without an answer: a rejection too
    return int(reply[9:12])


def still_serving(server) -> None:
    response = httpx.get(f"{server.url}/api/ok", timeout=5)
    assert response.status_code == 200
    assert response.json()["path"] == "/api/ok"


SMUGGLED = b"GET /api/smuggled HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(
            b"GET /api/x HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n",
            id="huge-header",
        ),
        pytest.param(
            b"GET /api/x HTTP/1.1\r\nHost: x\r\n"
            + b"".join(b"X-%d: %s\r\n" % (i, b"v" * 900) for i in range(90))
            + b"\r\n",
            id="headers-too-large-in-all",
        ),
        pytest.param(
            b"GET /api/x HTTP/1.1\r\nHost: x\r\n"
            + b"".join(b"X-%d: 1\r\n" % i for i in range(2000))
            + b"\r\n",
            id="many-headers",
        ),
        pytest.param(b"GET /api/x HTTP/1.1\r\nHost: x\r\nX-A: a\rb\r\n\r\n", id="bare-cr"),
        pytest.param(b"GET /api/x HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n", id="nul"),
        pytest.param(b"GET /api/x HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n", id="obs-fold"),
        pytest.param(
            b"POST /api/x HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\nhello", id="negative-cl"
        ),
        pytest.param(
            b"POST /api/x HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\nhello", id="text-cl"
        ),
        pytest.param(
            b"POST /api/x HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n"
            b"hello!",
            id="two-cl",
        ),
        pytest.param(
            b"POST /api/x HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
            id="cl-te",
        ),
        pytest.param(
            b"POST /api/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Length: 60\r\n\r\n0\r\n\r\n" + SMUGGLED,
            id="te-cl",
        ),
        pytest.param(
            b"POST /api/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\n"
            b"0\r\n\r\n" + SMUGGLED,
            id="te-unknown",
        ),
        pytest.param(
            b"POST /api/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n"
            b"0\r\n\r\n" + SMUGGLED,
            id="te-list",
        ),
    ],
)
def test_hostile_requests_are_refused(serve, upstreams, raw: bytes) -> None:
    server, balancer = balanced(serve, [upstreams[0].url])
    status = status_of(exchange(server.port, raw))
    assert status is None or 400 <= status < 500, status
    assert "/api/smuggled" not in upstreams[0].app.seen
    assert "/api/x" not in upstreams[0].app.seen
    still_serving(server)
    assert balancer.pools["api"].active_requests == 0


@pytest.mark.parametrize(
    "path",
    [
        pytest.param(b"/api/../../etc/passwd", id="climb"),
        pytest.param(b"/api/%2e%2e/%2e%2e/x", id="encoded-dots"),
        pytest.param(b"/api/..%2f..%2fx", id="encoded-slash"),
    ],
)
def test_paths_above_the_root_are_400_and_never_forwarded(serve, upstreams, path) -> None:
    server, _ = balanced(serve, [upstreams[0].url], prefix="/")
    reply = exchange(server.port, b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status_of(reply) == 400
    assert b"application/problem+json" in reply
    assert upstreams[0].app.seen == []
    still_serving(server)


def test_dot_segments_inside_the_root_are_resolved(serve, upstreams) -> None:
    server, _ = balanced(serve, [upstreams[0].url])
    reply = exchange(
        server.port, b"GET /api/a/../b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert status_of(reply) == 200
    assert upstreams[0].app.seen == ["/api/b"]


def test_absolute_form_target_goes_only_to_our_own_backends(serve, upstreams) -> None:
    server, _ = balanced(serve, [upstreams[0].url])
    reply = exchange(
        server.port,
        b"GET http://evil.example/api/x HTTP/1.1\r\nHost: evil.example\r\n"
        b"Connection: close\r\n\r\n",
    )
    # uvicorn takes the path of an absolute-form target; it is routed like
    # any other, to our own backends and nowhere else
    assert status_of(reply) == 200
    assert b'"backend": "a"' in reply
    assert upstreams[0].app.seen == ["/api/x"]
    still_serving(server)


@pytest.mark.parametrize("mode", ["garbage", "reset", "close"])
def test_a_broken_upstream_is_502_and_its_connection_is_not_reused(
    serve, upstreams, raw_server, transport, mode
) -> None:
    bad = raw_server(mode)
    server, balancer = balanced(
        serve,
        [bad.url, upstreams[0].url],
        transport=transport,
        pool={"retries": {"attempts": 1}},
    )
    with httpx.Client() as client:
        response = client.post(f"{server.url}/api/x", content=b"once")
        assert response.status_code == 502
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["pool"] == "api"
        assert "127.0.0.1" not in response.text and str(bad.port) not in response.text
        # the healthy backend still answers, through the same balancer
        assert client.get(f"{server.url}/api/ok").json()["backend"] == "a"
    deadline = time.monotonic() + 2
    while balancer.pools["api"].active_requests and time.monotonic() < deadline:
        time.sleep(0.02)
    assert balancer.pools["api"].active_requests == 0
