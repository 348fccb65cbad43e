"""Every built-in algorithm as a user sees it: through the real proxy.

A real ``Balancer`` behind ``balancekit.asgi.BalanceMiddleware`` served by
uvicorn, in front of real upstreams on 127.0.0.1 that answer with their own
name, so each test counts who served what. The exact distributions are
unit-tested in test_algorithms and test_algorithm_tables; here the point is
that the proxy feeds each algorithm what it needs (in-flight counts while
requests are held open, latencies, keys from headers, cookies, queries and
paths, eligibility as backends come and go) and that its choice reaches the
wire. Waits are bounded by deadlines; nothing asserts on how long anything
took.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from balancekit import Balancer
from tests.conftest import ServerThread
from tests.helpers import balanced
from tests.upstreams import NamedUpstream

Serve = Callable[..., ServerThread]
Named = Callable[..., list[ServerThread]]


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"still waiting after {timeout} s for {what}")
        time.sleep(0.01)


def upstream(server: ServerThread) -> NamedUpstream:
    app = server.app
    assert isinstance(app, NamedUpstream)
    return app


@pytest.fixture
def named(serve: Serve) -> Named:
    """``named("a", "b")``: one running NamedUpstream per name."""

    def make(*names: str) -> list[ServerThread]:
        return [serve(NamedUpstream(name)) for name in names]

    return make


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10) as keep_alive:
        yield keep_alive


def ask(client: httpx.Client, proxy: ServerThread, path: str = "/api/x", **kwargs: Any) -> str:
    """The name of the backend that answered one GET through the proxy."""
    response = client.get(proxy.url + path, **kwargs)
    assert response.status_code == 200, response.text
    return response.text


def ask_many(client: httpx.Client, proxy: ServerThread, count: int, **kwargs: Any) -> list[str]:
    return [ask(client, proxy, **kwargs) for _ in range(count)]


def urls(servers: list[ServerThread]) -> list[str]:
    return [server.url for server in servers]


def states(balancer: Balancer) -> list[str]:
    return [b["state"] for b in balancer.status()["pools"]["api"]["backends"]]


def reseed(balancer: Balancer, seed: int) -> None:
    """Swap the pool's random algorithm for the same one with a seeded rng.

    The configuration cannot carry a ``random.Random``; the pool's algorithm
    can be replaced at run time, which is what a user would do too.
    """
    pool = balancer.pools["api"]
    pool.algorithm = type(pool.algorithm)(rng=random.Random(seed))  # type: ignore[call-arg]


# --- round robin, random and their weighted forms ---------------------------


def test_round_robin_takes_backends_in_turn(serve: Serve, named: Named, client: httpx.Client):
    servers = named("a", "b", "c")
    proxy, _ = balanced(serve, urls(servers), pool={"algorithm": "round_robin"})
    seen = ask_many(client, proxy, 30)
    assert Counter(seen) == {"a": 10, "b": 10, "c": 10}
    assert len(set(seen[:3])) == 3
    assert seen == seen[:3] * 10  # the same turn, over and over


def test_random_reaches_every_backend(serve: Serve, named: Named, client: httpx.Client):
    servers = named("a", "b", "c")
    proxy, balancer = balanced(serve, urls(servers), pool={"algorithm": "random"})
    reseed(balancer, 7)
    seen = Counter(ask_many(client, proxy, 60))
    assert set(seen) == {"a", "b", "c"}
    assert max(seen.values()) <= 35, seen  # not stuck on one


def test_weighted_random_follows_the_weights(serve: Serve, named: Named, client: httpx.Client):
    a, b, c = named("a", "b", "c")
    backends = [{"url": a.url, "weight": 6}, {"url": b.url, "weight": 3}, c.url]
    proxy, balancer = balanced(serve, backends, pool={"algorithm": "weighted_random"})
    reseed(balancer, 11)
    seen = Counter(ask_many(client, proxy, 200))
    assert seen["a"] > seen["b"] > seen["c"] > 0, seen
    assert seen["a"] > 90, seen  # about 120 expected


def test_weighted_round_robin_is_nginx_s_sequence(serve: Serve, named: Named, client: httpx.Client):
    a, b, c = named("a", "b", "c")
    backends = [{"url": a.url, "weight": 5}, b.url, c.url]
    proxy, _ = balanced(serve, backends, pool={"algorithm": "weighted_round_robin"})
    assert " ".join(ask_many(client, proxy, 21)) == " ".join(["a a b a c a a"] * 3)


# --- least connections: requests held open ----------------------------------


def test_least_connections_avoids_the_backend_holding_requests(
    serve: Serve, named: Named, client: httpx.Client
):
    servers = named("a", "b", "c")
    a, b, c = (upstream(s) for s in servers)
    proxy, balancer = balanced(serve, urls(servers), pool={"algorithm": "least_connections"})
    pool = balancer.pools["api"]
    held: list[Future[httpx.Response]] = []
    with ThreadPoolExecutor(3) as executor:
        try:
            # Three requests held open: one on each backend, the fewest first.
            for _ in range(3):
                held.append(executor.submit(httpx.get, proxy.url + "/api/hold", timeout=15))
                wait_until(lambda: pool.active_requests == len(held), f"{len(held)} held")
            wait_until(lambda: a.holding == b.holding == c.holding == 1, "one held on each")
            # b and c finish theirs; a still has one in flight.
            b.release.set()
            c.release.set()
            wait_until(lambda: pool.active_requests == 1, "b and c to finish")
            assert a.holding == 1
            assert Counter(ask_many(client, proxy, 10)) == {"b": 5, "c": 5}
        finally:
            a.release.set()
            b.release.set()
            c.release.set()
        assert sorted(f.result(timeout=10).text for f in held) == ["a", "b", "c"]
    wait_until(lambda: pool.active_requests == 0, "a to finish")
    # Nothing in flight anywhere: a is back in the turn.
    assert Counter(ask_many(client, proxy, 9)) == {"a": 3, "b": 3, "c": 3}


# --- latency-aware: a slow backend -------------------------------------------


def sample_every_backend(client: httpx.Client, proxy: ServerThread, balancer: Balancer) -> None:
    """Send requests until every backend has a latency sample (30 at most)."""
    for _ in range(30):
        backends = balancer.status()["pools"]["api"]["backends"]
        if all(b["latency_ewma_ms"] is not None for b in backends):
            return
        ask(client, proxy)
    raise AssertionError("30 requests did not sample every backend")


@pytest.mark.parametrize("algorithm", ["least_response_time", "p2c"])
def test_latency_aware_algorithms_steer_away_from_a_slow_backend(
    serve: Serve, named: Named, client: httpx.Client, algorithm: str
):
    servers = named("a", "b", "c")
    upstream(servers[0]).delay = 0.2
    proxy, balancer = balanced(serve, urls(servers), pool={"algorithm": algorithm})
    sample_every_backend(client, proxy, balancer)
    later = Counter(ask_many(client, proxy, 30))
    # 200 ms against about 1 ms: a is out of the running for the default
    # 10 s decay. One pick of slack for a stall of b and c on a busy machine.
    # (least_response_time may well send all 30 to whichever of b and c
    # answered fastest: that is its rule.)
    assert later["a"] <= 1, later


@pytest.mark.parametrize("algorithm", ["least_response_time", "p2c"])
def test_a_slow_backend_that_recovers_wins_traffic_back(
    serve: Serve, named: Named, client: httpx.Client, algorithm: str
):
    servers = named("a", "b", "c")
    a = upstream(servers[0])
    a.delay = 0.2
    # A short decay (half-life, seconds) so that the slow sample ages fast.
    pool = {"algorithm": {"name": algorithm, "decay": 0.02}}
    proxy, balancer = balanced(serve, urls(servers), pool=pool)
    sample_every_backend(client, proxy, balancer)
    a.delay = 0
    served = a.served
    recent: list[str] = []
    deadline = time.monotonic() + 10
    while recent[-30:].count("a") < 5:  # a fair share is 10 of 30
        assert time.monotonic() < deadline, (
            f"a, fast again, served {a.served - served} requests in 10 s; "
            f"last 30: {Counter(recent[-30:])}"
        )
        recent.append(ask(client, proxy))
        time.sleep(0.005)


# --- hashing: the same key to the same backend -------------------------------


def cookie(value: str) -> dict[str, Any]:
    # httpx deprecates per-request cookies=; the header is what a browser sends.
    return {"headers": {"Cookie": f"sid={value}"}}


KEYS: dict[str, tuple[str, Callable[[str], tuple[str, dict[str, Any]]]]] = {
    "header": ("header:X-User", lambda k: ("/api/x", {"headers": {"X-User": k}})),
    "cookie": ("cookie:sid", lambda k: ("/api/x", cookie(k))),
    "query": ("query:user", lambda k: ("/api/x", {"params": {"user": k}})),
    "path": ("path", lambda k: (f"/api/{k}", {})),
}


@pytest.mark.parametrize("kind", list(KEYS))
@pytest.mark.parametrize("algorithm", ["consistent_hash", "maglev"])
def test_hashing_keeps_each_key_on_one_backend_and_spreads_keys(
    serve: Serve, named: Named, client: httpx.Client, algorithm: str, kind: str
):
    servers = named("a", "b", "c", "d")
    key, request = KEYS[kind]
    pool = {"algorithm": {"name": algorithm, "key": key}}
    proxy, _ = balanced(serve, urls(servers), pool=pool)
    homes: dict[str, str] = {}
    for i in range(24):
        path, kwargs = request(f"user-{i}")
        answers = {ask(client, proxy, path, **kwargs) for _ in range(3)}
        assert len(answers) == 1, f"{key}: user-{i} went to {sorted(answers)}"
        homes[f"user-{i}"] = answers.pop()
    assert len(set(homes.values())) >= 3, f"{key}: 24 keys on {Counter(homes.values())}"
    if kind != "path":  # every request has a path
        # Without the key, requests are spread (round robin), not piled on one.
        assert Counter(ask_many(client, proxy, 8)) == {"a": 2, "b": 2, "c": 2, "d": 2}


@pytest.mark.parametrize(("algorithm", "may_move"), [("consistent_hash", 0), ("maglev", 3)])
def test_hashing_moves_only_the_keys_of_a_backend_that_leaves_and_gives_them_back(
    serve: Serve, named: Named, client: httpx.Client, algorithm: str, may_move: int
):
    servers = named("a", "b", "c", "d")
    proxy, balancer = balanced(
        serve, urls(servers), pool={"algorithm": {"name": algorithm, "key": "header:X-User"}}
    )
    users = [f"user-{i}" for i in range(40)]

    def homes() -> dict[str, str]:
        return {u: ask(client, proxy, headers={"X-User": u}) for u in users}

    before = homes()
    pool = balancer.pools["api"]
    pool.disable(servers[1].url)  # b
    during = homes()
    assert "b" not in during.values()
    moved = [u for u in users if before[u] != "b" and during[u] != before[u]]
    assert len(moved) <= may_move, f"keys of other backends moved: {moved}"
    pool.enable(servers[1].url)
    assert homes() == before  # b takes its keys back


@pytest.mark.parametrize(("bounded_load", "most"), [(None, 8), (1.25, 3)])
def test_consistent_hash_bounded_load_spills_a_hot_key(
    serve: Serve, named: Named, bounded_load: float | None, most: int
):
    servers = named("a", "b", "c", "d")
    holders = [upstream(s) for s in servers]
    algorithm: dict[str, Any] = {"name": "consistent_hash", "key": "header:X-User"}
    if bounded_load is not None:
        algorithm["bounded_load"] = bounded_load
    proxy, balancer = balanced(serve, urls(servers), pool={"algorithm": algorithm})
    pool = balancer.pools["api"]
    held: list[Future[httpx.Response]] = []
    hot = {"X-User": "everybody-wants-this"}
    with ThreadPoolExecutor(8) as executor:
        try:
            for _ in range(8):  # one at a time, so each pick sees the last one in flight
                held.append(
                    executor.submit(httpx.get, proxy.url + "/api/hold", headers=hot, timeout=15)
                )
                # Counted by the pool when picked, by the upstream once it arrives.
                wait_until(
                    lambda: (
                        pool.active_requests == len(held)
                        and sum(u.holding for u in holders) == len(held)
                    ),
                    f"{len(held)} held",
                )
            holding = sorted((u.holding for u in holders), reverse=True)
        finally:
            for u in holders:
                u.release.set()
        assert all(f.result(timeout=10).status_code == 200 for f in held)
    # Unbounded, a hot key piles on its backend; bounded by 1.25, no backend
    # carries more than ceil(1.25 x 8 / 4) = 3 and the rest spill along the ring.
    assert sum(holding) == 8
    assert holding[0] == most, holding


# --- first and backups: take over, give back ---------------------------------


def test_first_takes_the_first_eligible_in_order_and_gives_back(
    serve: Serve, named: Named, client: httpx.Client
):
    a, b, spare = named("a", "b", "spare")
    backends = [a.url, b.url, {"url": spare.url, "backup": True}]
    proxy, balancer = balanced(serve, backends, pool={"algorithm": "first"})
    pool = balancer.pools["api"]
    assert set(ask_many(client, proxy, 4)) == {"a"}
    pool.disable(a.url)
    assert set(ask_many(client, proxy, 4)) == {"b"}
    pool.drain(b.url)
    assert set(ask_many(client, proxy, 4)) == {"spare"}
    pool.enable(b.url)
    assert set(ask_many(client, proxy, 4)) == {"b"}
    pool.enable(a.url)
    assert set(ask_many(client, proxy, 4)) == {"a"}


def test_backups_take_over_when_the_primaries_go_down_and_give_back(
    serve: Serve, named: Named, client: httpx.Client
):
    a, b, spare = named("a", "b", "spare")
    backends = [a.url, b.url, {"url": spare.url, "backup": True}]
    checks = {"type": "http", "path": "/", "interval": 0.05, "timeout": 1, "rise": 1, "fall": 1}
    proxy, balancer = balanced(
        serve, backends, pool={"algorithm": "round_robin", "health_check": checks}
    )
    assert Counter(ask_many(client, proxy, 6)) == {"a": 3, "b": 3}
    ports = {"a": a.port, "b": b.port}
    a.stop()
    b.stop()  # the processes are gone: connections are refused
    wait_until(lambda: states(balancer) == ["unhealthy", "unhealthy", "healthy"], "checks")
    assert set(ask_many(client, proxy, 6)) == {"spare"}
    for name, port in ports.items():
        serve(NamedUpstream(name), port=port)  # back, on the same address
    wait_until(lambda: states(balancer) == ["healthy"] * 3, "a and b to pass a check")
    assert Counter(ask_many(client, proxy, 6)) == {"a": 3, "b": 3}
