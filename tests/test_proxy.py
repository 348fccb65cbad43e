"""The async engine end to end: a real client, uvicorn, the middleware, real upstreams."""

from __future__ import annotations

import socket
import time
from collections import Counter

import httpx
import pytest

from tests.conftest import ENGINES, asgi_only, closed_port_url
from tests.helpers import balanced
from tests.upstreams import make_echo_app


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest) -> str:
    """Here every test runs on the WSGI engine too."""
    return str(request.param)


def get_json(url: str, **kwargs) -> dict:
    response = httpx.get(url, timeout=10, **kwargs)
    assert response.status_code == 200, response.text
    return response.json()


def test_routes_and_passes_the_rest_to_the_app(serve, upstreams, engine) -> None:
    server, _ = balanced(serve, [upstreams[0].url], engine=engine)
    echoed = get_json(f"{server.url}/api/users?x=1&y=%20")
    assert (echoed["method"], echoed["path"], echoed["query"]) == ("GET", "/api/users", "x=1&y=%20")
    assert get_json(f"{server.url}/api")["path"] == "/api"
    unrouted = httpx.get(f"{server.url}/apix")
    assert (unrouted.status_code, unrouted.text, unrouted.headers["x-app"]) == (200, "app", "1")


def test_round_robin_over_real_backends(serve, upstreams, engine) -> None:
    server, balancer = balanced(serve, [u.url for u in upstreams], engine=engine)
    with httpx.Client() as client:
        seen = [client.get(f"{server.url}/api/x").json()["backend"] for _ in range(9)]
    assert Counter(seen) == {"a": 3, "b": 3, "c": 3}
    status = balancer.status()["pools"]["api"]["backends"]
    assert [b["requests_total"] for b in status] == [3, 3, 3]
    assert all(b["latency_ewma_ms"] > 0 for b in status)


def test_strip_prefix_and_backend_path(serve, upstreams, engine) -> None:
    server, _ = balanced(serve, [upstreams[0].url + "/base"], engine=engine, strip_prefix=True)
    assert get_json(f"{server.url}/api/users?x=1")["path"] == "/base/users"
    assert get_json(f"{server.url}/api")["path"] == "/base/"


def test_percent_encoding_and_dot_segments(serve, upstreams, engine) -> None:
    server, _ = balanced(serve, [upstreams[0].url], engine=engine)
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(b"GET /api/a%20b/../c%2Fd HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 200 ")
    assert b'"raw_path": "/api/c%2Fd"' in reply


def test_request_headers_upstream(serve, upstreams, engine) -> None:
    server, _ = balanced(serve, [upstreams[0].url], engine=engine)
    echoed = get_json(
        f"{server.url}/api/h",
        headers={
            "Host": "public.example:8443",
            "Connection": "X-Hop",
            "X-Hop": "secret",
            "X-Forwarded-For": "6.6.6.6",
            "X-Custom": "kept",
        },
    )
    headers = dict(echoed["headers"])
    assert headers["host"] == f"127.0.0.1:{upstreams[0].port}"
    assert headers["x-forwarded-for"] == "127.0.0.1"
    assert headers["x-forwarded-proto"] == "http"
    assert headers["x-forwarded-host"] == "public.example:8443"
    assert headers["x-custom"] == "kept"
    assert "x-hop" not in headers
    assert "user-agent" in headers  # the client's own, not the engine's
    assert headers["user-agent"].startswith("python-httpx")


def test_preserve_host_and_trusted_proxies(serve, upstreams, engine) -> None:
    server, _ = balanced(
        serve,
        [upstreams[0].url],
        engine=engine,
        pool={"preserve_host": True},
        trusted_proxies=["127.0.0.0/8"],
    )
    echoed = get_json(
        f"{server.url}/api/h",
        headers={
            "Host": "public.example",
            "X-Forwarded-For": "6.6.6.6",
            "X-Forwarded-Proto": "https",
        },
    )
    headers = dict(echoed["headers"])
    assert headers["host"] == "public.example"
    assert headers["x-forwarded-for"] == "6.6.6.6, 127.0.0.1"
    assert headers["x-forwarded-proto"] == "https"


def test_set_cookie_headers_are_kept_apart(serve, upstreams, engine) -> None:
    server, _ = balanced(serve, [upstreams[0].url], engine=engine, prefix="/")
    response = httpx.get(f"{server.url}/cookies")
    assert response.headers.get_list("set-cookie") == ["a=1; Path=/", "b=2; Path=/"]
    assert len(response.headers.get_list("date")) == 1


def test_post_body_round_trip(serve, upstreams, engine) -> None:
    server, _ = balanced(serve, [upstreams[0].url], engine=engine)
    payload = bytes(range(256)) * 4000

    def chunks():
        for i in range(0, len(payload), 65536):
            yield payload[i : i + 65536]

    import hashlib

    for content in (payload, chunks()):
        echoed = httpx.post(f"{server.url}/api/upload", content=content, timeout=10).json()
        assert echoed["method"] == "POST"
        assert echoed["body_size"] == len(payload)
        assert echoed["body_sha256"] == hashlib.sha256(payload).hexdigest()


def test_head_and_no_content(serve, upstreams, engine) -> None:
    server, _ = balanced(serve, [upstreams[0].url], engine=engine, prefix="/")
    head = httpx.head(f"{server.url}/big?mb=1")
    assert head.status_code == 200
    assert head.headers["content-length"] == str(1024 * 1024)
    assert head.content == b""
    assert httpx.get(f"{server.url}/status/204").status_code == 204


def test_first_chunk_arrives_before_the_backend_finishes(serve, upstreams, engine) -> None:
    server, _ = balanced(serve, [upstreams[0].url], engine=engine, prefix="/")
    started = time.monotonic()
    arrivals = []
    with httpx.stream("GET", f"{server.url}/stream?chunks=4&delay=0.5", timeout=10) as response:
        for chunk in response.iter_raw():
            arrivals.append((time.monotonic() - started, chunk))
    assert b"".join(c for _, c in arrivals) == b"chunk0\nchunk1\nchunk2\nchunk3\n"
    # the backend needs about 2 s; the first chunk must not wait for it
    assert arrivals[0][0] < 1.0
    assert arrivals[-1][0] >= 1.5


def test_upstream_5xx_is_passed_through_and_counted(serve, upstreams, engine) -> None:
    server, balancer = balanced(serve, [upstreams[0].url], engine=engine, prefix="/")
    response = httpx.get(f"{server.url}/status/503")
    assert response.status_code == 503
    assert response.json() == {"backend": "a"}
    assert balancer.status()["pools"]["api"]["backends"][0]["failures_total"] == 1


def problem(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["status"] == status
    assert body["pool"] == "api"
    assert "127.0.0.1" not in response.text
    return body


def test_refused_upstream_is_502(serve, engine) -> None:
    server, _ = balanced(serve, [closed_port_url()], engine=engine)
    problem(httpx.get(f"{server.url}/api/x"), 502)


def test_timeout_is_504(serve, upstreams, engine) -> None:
    server, balancer = balanced(
        serve,
        [upstreams[0].url],
        engine=engine,
        prefix="/",
        pool={"timeouts": {"read": 0.3}, "retries": {"attempts": 1}},
    )
    started = time.monotonic()
    problem(httpx.get(f"{server.url}/sleep?s=3", timeout=10), 504)
    assert time.monotonic() - started < 2
    assert balancer.pools["api"].active_requests == 0


def test_no_eligible_backend_is_503_with_retry_after(serve, upstreams, engine) -> None:
    server, balancer = balanced(serve, [upstreams[0].url], engine=engine)
    balancer.pools["api"].disable(upstreams[0].url)
    response = httpx.get(f"{server.url}/api/x")
    problem(response, 503)
    assert int(response.headers["retry-after"]) > 0


def test_get_is_retried_on_another_backend_when_connect_fails(serve, upstreams, engine) -> None:
    dead = closed_port_url()
    server, balancer = balanced(serve, [dead, upstreams[0].url], engine=engine)
    with httpx.Client() as client:
        for _ in range(4):
            assert client.get(f"{server.url}/api/x").json()["backend"] == "a"
            assert client.post(f"{server.url}/api/x", content=b"hi").json()["backend"] == "a"
    assert balancer.pools["api"].backend(dead).failures_total == 4


def test_post_is_never_retried_after_it_was_sent(serve, upstreams, raw_server, engine) -> None:
    reset = raw_server("reset")
    server, _ = balanced(serve, [reset.url, upstreams[0].url], engine=engine)
    with httpx.Client() as client:
        # round robin starts on the resetting backend
        response = client.post(f"{server.url}/api/order", content=b"pay once")
        problem(response, 502)
        assert "/api/order" not in upstreams[0].app.seen
        assert reset.requests == 1
        # the same failure on a GET is retried on the healthy backend
        assert client.get(f"{server.url}/api/x").json()["backend"] == "a"
        assert client.get(f"{server.url}/api/y").json()["backend"] == "a"
    assert reset.requests == 2


def test_no_retry_after_response_bytes(serve, upstreams, raw_server, engine) -> None:
    cut = raw_server("truncated")
    server, balancer = balanced(serve, [cut.url, upstreams[0].url], engine=engine)
    with pytest.raises(httpx.RemoteProtocolError):
        httpx.get(f"{server.url}/api/x")
    assert upstreams[0].app.seen == []
    assert cut.requests == 1
    deadline = time.monotonic() + 2
    while balancer.pools["api"].active_requests and time.monotonic() < deadline:
        time.sleep(0.02)
    assert balancer.pools["api"].active_requests == 0


def test_client_disconnect_cancels_the_upstream_request(serve, engine) -> None:
    asgi_only(engine, "a WSGI app cannot notice a client leaving while it waits upstream")
    upstream = serve(make_echo_app("slow"))
    server, balancer = balanced(serve, [upstream.url], engine=engine, prefix="/")
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"GET /slow-headers HTTP/1.1\r\nHost: x\r\n\r\n")
        deadline = time.monotonic() + 5
        while not upstream.app.seen and time.monotonic() < deadline:
            time.sleep(0.02)
        assert upstream.app.seen == ["/slow-headers"]
        assert balancer.pools["api"].active_requests == 1
    deadline = time.monotonic() + 5
    while (
        balancer.pools["api"].active_requests or not upstream.app.cancelled
    ) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert balancer.pools["api"].active_requests == 0
    assert upstream.app.cancelled == ["/slow-headers"]
    # a client that left is not the backend's failure
    assert balancer.pools["api"].backends[0].failures_total == 0


def test_lifespan_reaches_the_wrapped_app(serve, upstreams) -> None:
    from balancekit.asgi import BalanceMiddleware

    events = []

    async def app(scope, receive, send):
        assert scope["type"] == "lifespan"
        while True:
            message = await receive()
            events.append(message["type"])
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return

    config = {"pools": {"api": {"backends": [upstreams[0].url]}}}
    server = serve(BalanceMiddleware(app, config=config), lifespan="on")
    server.stop()
    assert events == ["lifespan.startup", "lifespan.shutdown"]


def test_an_upstream_that_stops_reading_the_body_is_a_504(serve, raw_server, engine) -> None:
    stall = raw_server("stall")
    server, balancer = balanced(
        serve, [stall.url], engine=engine, pool={"timeouts": {"write": 0.5, "read": 30}}
    )

    def body():
        block = b"z" * 65536
        for _ in range(1600):  # 100 MiB: far more than the socket buffers hold
            yield block

    started = time.monotonic()
    response = httpx.post(f"{server.url}/api/upload", content=body(), timeout=20)
    assert time.monotonic() - started < 10
    problem(response, 504)
    deadline = time.monotonic() + 3
    while balancer.pools["api"].active_requests and time.monotonic() < deadline:
        time.sleep(0.02)
    assert balancer.pools["api"].active_requests == 0
    assert balancer.pools["api"].backends[0].failures_total == 1
