"""The pool's queue (CONTRACT section 11): with every eligible backend at
``max_connections``, up to ``max_pending`` requests wait, first come first
served, for up to ``queue_timeout``; a client that leaves frees its place.

The pool's side is tested directly (the order in which places are handed
over), the rest end to end on every engine against real upstreams.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from balancekit import Balancer, NoEligibleBackend, RequestInfo
from tests.conftest import ENGINES, asgi_only
from tests.helpers import balanced
from tests.upstreams import make_echo_app

REQUEST = RequestInfo("GET", "/")


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def one_slot_pool(max_pending: int, backends: int = 1) -> Any:
    urls = [f"http://127.0.0.1:{9001 + i}" for i in range(backends)]
    config = {
        "pools": {
            "api": {"backends": urls, "max_connections": 1, "max_pending": max_pending},
        },
        "routes": [{"prefix": "/", "pool": "api"}],
    }
    return Balancer(config).pools["api"]


def full(pool: Any) -> NoEligibleBackend:
    with pytest.raises(NoEligibleBackend) as caught:
        pool.acquire(REQUEST)
    return caught.value


# --- the pool's queue ------------------------------------------------------------


def test_places_are_handed_over_first_come_first_served() -> None:
    pool = one_slot_pool(max_pending=3)
    held = pool.acquire(REQUEST)
    assert full(pool).full
    woken: list[int] = []
    waiters = [pool.enqueue(REQUEST, (), lambda i=i: woken.append(i)) for i in range(3)]
    assert pool.status()["queued"] == 3
    assert all(w.backend is None for w in waiters)

    # A request arriving now finds no place, even though one is about to
    # come free: the queue is ahead of it.
    pool.release(held, ok=True, latency_ms=1.0)
    assert woken == [0]
    assert waiters[0].backend is held and held.active_requests == 1
    assert full(pool).full
    for i in (1, 2):
        assert pool.leave(waiters[i - 1], keep=True) is held
        pool.release(held, ok=True, latency_ms=1.0)
        assert woken == list(range(i + 1))
    assert pool.status()["queued"] == 0


def test_a_full_queue_and_a_pool_without_backends_refuse_at_once() -> None:
    pool = one_slot_pool(max_pending=1)
    pool.acquire(REQUEST)
    pool.enqueue(REQUEST, (), lambda: None)
    with pytest.raises(NoEligibleBackend, match="1 requests already wait"):
        pool.enqueue(REQUEST, (), lambda: None)

    empty = one_slot_pool(max_pending=1)
    empty.disable("http://127.0.0.1:9001")
    error = full(empty)
    assert not error.full  # nothing to wait for: no backend is eligible
    with pytest.raises(NoEligibleBackend):
        empty.enqueue(REQUEST, (), lambda: None)


def test_a_waiter_that_leaves_gives_its_place_or_its_backend_on() -> None:
    pool = one_slot_pool(max_pending=3)
    held = pool.acquire(REQUEST)
    woken: list[str] = []
    first, second, third = (pool.enqueue(REQUEST, (), lambda n=n: woken.append(n)) for n in "abc")

    assert pool.leave(second, keep=False) is None  # left while still in line
    assert pool.status()["queued"] == 2

    pool.release(held, ok=True, latency_ms=1.0)  # handed to the first ...
    assert pool.leave(first, keep=False) is None  # ... who had just gone
    assert woken == ["a", "c"]
    assert third.backend is held
    assert held.active_requests == 1 and held.requests_total == 2  # the first never went
    assert pool.status()["queued"] == 0


def test_a_backend_becoming_eligible_serves_the_queue() -> None:
    pool = one_slot_pool(max_pending=1, backends=2)
    pool.disable("http://127.0.0.1:9002")
    pool.acquire(REQUEST)
    woken = threading.Event()
    waiter = pool.enqueue(REQUEST, (), woken.set)
    pool.enable("http://127.0.0.1:9002")
    assert woken.is_set()
    assert waiter.backend is not None and waiter.backend.url == "http://127.0.0.1:9002"


# --- end to end ------------------------------------------------------------------


def queued_balancer(serve: Callable[..., Any], engine: str, **pool: Any) -> tuple[Any, Balancer]:
    upstream = serve(make_echo_app("a"))
    return balanced(
        serve,
        [upstream.url],
        engine=engine,
        strip_prefix=True,
        pool={"max_connections": 1, **pool},
    )


def in_background(url: str, results: list[Any]) -> threading.Thread:
    def get() -> None:
        started = time.monotonic()
        response = httpx.get(url, timeout=10)
        results.append((response.status_code, time.monotonic() - started))

    thread = threading.Thread(target=get)
    thread.start()
    return thread


def wait_for(condition: Callable[[], bool], seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


def queued(balancer: Balancer) -> int:
    count: int = balancer.status()["pools"]["api"]["queued"]
    return count


def test_a_queued_request_is_served_when_the_backend_frees(serve, engine) -> None:
    server, balancer = queued_balancer(serve, engine, max_pending=2, queue_timeout=5)
    holder: list[Any] = []
    thread = in_background(f"{server.url}/api/sleep?s=0.5", holder)
    wait_for(lambda: balancer.status()["pools"]["api"]["active_requests"] == 1)
    results: list[Any] = []
    waiting = in_background(f"{server.url}/api/x", results)
    wait_for(lambda: queued(balancer) == 1)
    thread.join()
    waiting.join()
    assert holder[0][0] == 200 and results[0][0] == 200
    assert queued(balancer) == 0


def test_without_a_place_or_after_queue_timeout_the_answer_is_503(serve, engine) -> None:
    server, balancer = queued_balancer(serve, engine, max_pending=1, queue_timeout=0.3)
    holder: list[Any] = []
    thread = in_background(f"{server.url}/api/sleep?s=1.5", holder)
    wait_for(lambda: balancer.status()["pools"]["api"]["active_requests"] == 1)
    timed_out: list[Any] = []
    waiting = in_background(f"{server.url}/api/x", timed_out)
    wait_for(lambda: queued(balancer) == 1)

    overflow = httpx.get(f"{server.url}/api/x", timeout=10)  # the one place is taken
    assert overflow.status_code == 503
    assert overflow.headers["content-type"] == "application/problem+json"

    waiting.join()
    status, waited = timed_out[0]
    assert status == 503
    assert 0.25 <= waited < 1.4  # queue_timeout, well before the holder ends
    thread.join()
    assert holder[0][0] == 200 and queued(balancer) == 0


def test_a_client_that_leaves_the_queue_frees_its_place(serve, engine) -> None:
    asgi_only(engine, "WSGI gives no sign that a client left")
    server, balancer = queued_balancer(serve, engine, max_pending=1, queue_timeout=5)
    holder: list[Any] = []
    thread = in_background(f"{server.url}/api/sleep?s=1.5", holder)
    wait_for(lambda: balancer.status()["pools"]["api"]["active_requests"] == 1)

    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as leaver:
        leaver.sendall(b"GET /api/x HTTP/1.1\r\nHost: t\r\n\r\n")
        wait_for(lambda: queued(balancer) == 1)
    wait_for(lambda: queued(balancer) == 0)  # its place is free ...

    results: list[Any] = []
    waiting = in_background(f"{server.url}/api/x", results)  # ... for this one
    wait_for(lambda: queued(balancer) == 1)
    thread.join()
    waiting.join()
    assert results[0][0] == 200
    backend = balancer.status()["pools"]["api"]["backends"][0]
    assert backend["requests_total"] == 2 and backend["active_requests"] == 0
