"""The lean server's fast path (balancekit._fastpath), against real upstreams.

Which requests take it, that a request it began and could not finish by
callbacks is finished by the coroutine path with the same decisions, and
that every way out settles the pool and never pools a half-read
upstream connection. The suites that hold both paths to the same bytes are
test_differential (``lean`` against ``lean-slow``), test_hostile,
test_rfc9112 and test_faults, which run on both.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.helpers import balanced
from tests.upstreams import make_echo_app


def _wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


@pytest.fixture
def echo(serve: Callable[..., Any]) -> Any:
    return serve(make_echo_app("a"))


def test_a_warm_get_is_answered_on_the_fast_path(serve, echo) -> None:
    server, balancer = balanced(serve, [echo.url], engine="lean")
    fast = server.server.fast
    with httpx.Client(base_url=server.url) as client:
        first = client.get("/api/users", params={"q": "1"}, headers={"x-request-id": "abc"})
        answers = [client.get("/api/users", params={"q": str(i)}) for i in range(5)]
    # The first finds no kept-alive connection: the coroutine path connects.
    # The last answer's bytes can reach the client before the server's
    # thread counts it: counts are read once they have settled.
    _wait_for(lambda: fast.answered == 5)
    assert fast.handed_over == 1
    assert fast.answered == 5
    assert first.status_code == 200
    assert first.headers["x-request-id"] == "abc"
    for i, answer in enumerate(answers):
        assert answer.status_code == 200
        echoed = answer.json()
        assert echoed["path"] == "/api/users"
        assert echoed["query"] == f"q={i}"
        assert dict(echoed["headers"])["x-forwarded-for"] == "127.0.0.1"
        assert len(answer.headers["x-request-id"]) == 36  # made here: none was sent
        assert "date" in answer.headers
    pool = balancer.pools["api"]
    assert pool.active_requests == 0
    assert pool.backends[0].requests_total == 6


@pytest.mark.parametrize("preserve_host", [False, True])
def test_the_upstream_gets_the_backends_host_or_the_clients(serve, echo, preserve_host) -> None:
    server, _ = balanced(serve, [echo.url], engine="lean", pool={"preserve_host": preserve_host})
    fast = server.server.fast
    with httpx.Client(base_url=server.url) as client:
        answers = [client.get("/api/h", headers={"Host": "public.example"}) for _ in range(3)]
    _wait_for(lambda: fast.answered == 2)  # counted after the last bytes went
    assert (fast.handed_over, fast.answered) == (1, 2)  # the first connected
    expected = "public.example" if preserve_host else echo.url.removeprefix("http://")
    for answer in answers:
        headers = answer.json()["headers"]
        assert [value for name, value in headers if name == "host"] == [expected]
        assert dict(headers)["x-forwarded-host"] == "public.example"


def test_requests_that_need_more_take_the_coroutine_path(serve, echo) -> None:
    server, _ = balanced(serve, [echo.url], engine="lean", pool={"timeouts": {"total": 5}})
    fast = server.server.fast
    with httpx.Client(base_url=server.url) as client:
        for _ in range(3):
            assert client.get("/api/a").status_code == 200  # a deadline: not here
            assert client.post("/api/a", content=b"body").status_code == 200
            assert client.head("/api/a").status_code == 200
    assert (fast.answered, fast.handed_over) == (0, 0)


def test_a_kept_alive_connection_the_backend_closed_is_retried_fresh(serve) -> None:
    # uvicorn closes an idle keep-alive after timeout_keep_alive: the next
    # request finds the pooled connection dead, after its write at worst.
    upstream = serve(make_echo_app("a"), timeout_keep_alive=1)
    server, balancer = balanced(serve, [upstream.url], engine="lean")
    with httpx.Client(base_url=server.url) as client:
        assert client.get("/api/one").status_code == 200
        assert client.get("/api/two").status_code == 200
        time.sleep(1.5)
        answer = client.get("/api/three")
    assert answer.status_code == 200
    assert answer.json()["path"] == "/api/three"
    assert balancer.pools["api"].active_requests == 0
    assert balancer.pools["api"].backends[0].failures_total == 0


def test_a_client_that_leaves_mid_body_settles_the_try(serve, echo) -> None:
    server, balancer = balanced(serve, [echo.url], engine="lean", strip_prefix=True)
    fast = server.server.fast
    with httpx.Client(base_url=server.url) as client:
        client.get("/api/warm")  # a kept-alive connection for the next one
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"GET /api/stream?chunks=20&delay=0.1 HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
    pool = balancer.pools["api"]
    _wait_for(lambda: pool.active_requests == 0)
    assert (fast.handed_over, fast.answered) == (1, 0)  # the stream never finished
    # The upstream connection was dropped, not pooled half-read: the next
    # request gets a whole answer of its own.
    with httpx.Client(base_url=server.url) as client:
        answer = client.get("/api/after")
    assert answer.json()["path"] == "/after"
    assert pool.backends[0].failures_total == 0  # the client left: no blame


@pytest.mark.parametrize("read", [0.5, 2.0], ids=["timer", "sweep"])
def test_a_silent_upstream_times_out(serve, echo, read: float) -> None:
    # Under SWEPT_READ_TIMEOUT the exchange has its own timer; from it up,
    # the server's once-a-second sweep checks it.
    timeouts = {"timeouts": {"read": read}, "retries": {"attempts": 1}}  # one wait, not two
    server, balancer = balanced(serve, [echo.url], engine="lean", strip_prefix=True, pool=timeouts)
    with httpx.Client(base_url=server.url, timeout=10) as client:
        client.get("/api/warm")
        began = time.monotonic()
        answer = client.get("/api/sleep", params={"s": "5"})
        waited = time.monotonic() - began
    assert answer.status_code == 504
    assert read <= waited < read + 1.5
    _wait_for(lambda: balancer.pools["api"].active_requests == 0)


def test_a_large_body_to_a_slow_reader_is_whole(serve, echo) -> None:
    server, _ = balanced(serve, [echo.url], engine="lean", strip_prefix=True)
    fast = server.server.fast
    with httpx.Client(base_url=server.url, timeout=30) as client:
        client.get("/api/warm")
        with client.stream("GET", "/api/big", params={"mb": "8"}) as big:
            size = 0
            for part in big.iter_bytes(64 * 1024):
                size += len(part)
                if size < 2 * 1024 * 1024:
                    time.sleep(0.002)  # a reader slower than the upstream
    assert size == 8 * 1024 * 1024
    _wait_for(lambda: fast.answered == 1)  # counted after the last bytes went
    assert (fast.handed_over, fast.answered) == (1, 1)  # the warm-up connected
