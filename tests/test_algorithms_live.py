"""Each algorithm as a user sees it: real proxy, real backends, real waiting.

The distributions are unit-tested in test_algorithms and test_algorithm_tables;
here the point is that the proxy feeds the algorithms what they need (in-flight
counts while requests are held open, latencies, keys from headers and
cookies, eligibility) and that their choice reaches the wire.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from tests.helpers import balanced
from tests.upstreams import complete_lifespan


class Named:
    """An upstream answering its name, after ``delay`` seconds, or holding
    requests to /hold until ``release`` is set."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.delay = 0.0
        self.release = threading.Event()
        self.holding = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await complete_lifespan(receive, send)
            return
        if scope["path"].endswith("/hold"):
            self.holding += 1
            await asyncio.to_thread(self.release.wait, 10)  # set from the test's thread
            self.holding -= 1
        elif self.delay:
            await asyncio.sleep(self.delay)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": self.name.encode()})


@pytest.fixture
def named(serve: Callable[..., Any]) -> Callable[..., list[Any]]:
    def make(*names: str) -> list[Any]:
        return [serve(Named(name)) for name in names]

    return make


@pytest.fixture
def client() -> Any:
    with httpx.Client() as keep_alive:
        yield keep_alive


def get(client: httpx.Client, proxy: Any, path: str = "/api/x", **kwargs: Any) -> str:
    cookies = kwargs.pop("cookies", None)
    if cookies:
        kwargs.setdefault("headers", {})["Cookie"] = "; ".join(
            f"{k}={v}" for k, v in cookies.items()
        )
    return str(client.get(proxy.url + path, **kwargs).text)


def test_round_robin_and_random_reach_every_backend(serve, named, client) -> None:
    servers = named("a", "b", "c")
    for algorithm in ("round_robin", "random"):
        proxy, _ = balanced(serve, [s.url for s in servers], pool={"algorithm": algorithm})
        seen = Counter(get(client, proxy) for _ in range(30))
        assert set(seen) == {"a", "b", "c"}
        if algorithm == "round_robin":
            assert seen == {"a": 10, "b": 10, "c": 10}


def test_weighted_round_robin_sequence_on_the_wire(serve, named, client) -> None:
    a, b, c = named("a", "b", "c")
    backends = [{"url": a.url, "weight": 5}, {"url": b.url}, {"url": c.url}]
    proxy, _ = balanced(serve, backends, pool={"algorithm": "weighted_round_robin"})
    with httpx.Client() as client:
        sequence = [client.get(proxy.url + "/api/x").text for _ in range(14)]
    assert " ".join(sequence) == "a a b a c a a a a b a c a a"


def test_least_connections_avoids_the_backend_holding_requests(serve, named, client) -> None:
    servers = named("a", "b", "c")
    a = servers[0].app
    proxy, balancer = balanced(
        serve, [s.url for s in servers], pool={"algorithm": "least_connections"}
    )
    pool = balancer.pools["api"]
    with ThreadPoolExecutor(4) as executor:
        # Three held requests: one on each backend, in turn.
        held = [executor.submit(httpx.get, proxy.url + "/api/hold", timeout=15) for _ in range(3)]
        while pool.active_requests < 3:
            threading.Event().wait(0.01)
        # b and c are freed; a keeps its request in flight.
        for server in servers[1:]:
            server.app.release.set()
        while pool.active_requests > 1:
            threading.Event().wait(0.01)
        assert a.holding == 1
        assert {get(client, proxy) for _ in range(10)} == {"b", "c"}
        a.release.set()
        assert sorted(f.result(timeout=10).text for f in held) == ["a", "b", "c"]


@pytest.mark.parametrize("algorithm", ["least_response_time", "p2c"])
def test_latency_aware_algorithms_steer_away_from_a_slow_backend(
    serve, named, client, algorithm
) -> None:
    servers = named("a", "b", "c")
    servers[0].app.delay = 0.15
    proxy, _ = balanced(serve, [s.url for s in servers], pool={"algorithm": algorithm})
    with httpx.Client() as client:
        for _ in range(6):  # every backend gets sampled
            client.get(proxy.url + "/api/x")
        later = Counter(client.get(proxy.url + "/api/x").text for _ in range(30))
    assert later["a"] <= 3, later  # p2c may draw a and a slow pair now and then


@pytest.mark.parametrize("algorithm", ["consistent_hash", "maglev"])
def test_hashing_keeps_a_key_on_one_backend(serve, named, client, algorithm) -> None:
    servers = named("a", "b", "c", "d")
    for key, send in (
        ("header:X-User", lambda k: {"headers": {"X-User": k}}),
        ("cookie:sid", lambda k: {"cookies": {"sid": k}}),
        ("query:user", lambda k: {"params": {"user": k}}),
    ):
        proxy, _ = balanced(
            serve, [s.url for s in servers], pool={"algorithm": {"name": algorithm, "key": key}}
        )
        homes = {}
        for i in range(24):
            answers = {get(client, proxy, "/api/x", **send(f"user-{i}")) for _ in range(3)}
            assert len(answers) == 1, f"{key}: user-{i} moved between {answers}"
            homes[i] = answers.pop()
        assert len(set(homes.values())) >= 3, f"{key}: 24 keys should spread"
        # a request without the key is spread, not pinned
        assert len({get(client, proxy) for _ in range(8)}) == 4


def test_first_and_backups_take_over_and_give_back(serve, named, client) -> None:
    a, b, spare = named("a", "b", "spare")
    backends = [a.url, b.url, {"url": spare.url, "backup": True}]
    proxy, balancer = balanced(serve, backends, pool={"algorithm": "first"})
    pool = balancer.pools["api"]
    assert {get(client, proxy) for _ in range(4)} == {"a"}
    pool.disable(a.url)
    assert {get(client, proxy) for _ in range(4)} == {"b"}
    pool.disable(b.url)
    assert {get(client, proxy) for _ in range(4)} == {"spare"}
    pool.enable(a.url)
    assert {get(client, proxy) for _ in range(4)} == {"a"}
