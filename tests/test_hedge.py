"""Hedged requests (CONTRACT section 16, ``hedge = { after, max }``): real
uvicorn backends, one slow, on every async transport; the first response
head wins, the slow try is cancelled and its connection dropped."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

from balancekit import Balancer, ConfigError
from balancekit._pool import RETRY_BUDGET_FLOOR
from balancekit.asgi import BalanceMiddleware
from tests.helpers import app_fallback
from tests.upstreams import RawServer, complete_lifespan


class Delayed:
    """An upstream that answers its name after ``seconds``, and counts the
    requests it began, answered, and saw the client (balancekit) leave."""

    def __init__(self, name: str, seconds: float) -> None:
        self.name = name
        self.seconds = seconds
        self.began = self.answered = self.left = 0
        self.lock = threading.Lock()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await complete_lifespan(receive, send)
            return
        with self.lock:
            self.began += 1
        while (await receive()).get("more_body"):
            pass
        left = asyncio.ensure_future(receive())  # http.disconnect, if it comes
        done, _ = await asyncio.wait([left], timeout=self.seconds)
        if done:
            with self.lock:
                self.left += 1
            return
        left.cancel()
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"x-backend", b"x")]}
        )
        await send({"type": "http.response.body", "body": self.name.encode()})
        with self.lock:
            self.answered += 1


def hedged(serve: Any, urls: list[str], transport: str, **pool: Any) -> tuple[Any, Balancer]:
    registry = CollectorRegistry()
    config = {
        "transport": transport,
        "pools": {"api": {"backends": urls, "algorithm": "first", **pool}},
        "routes": [{"prefix": "/", "pool": "api"}],
    }
    balancer = Balancer(config, metrics_registry=registry)
    return serve(BalanceMiddleware(app_fallback, balancer=balancer)), balancer


def counted(balancer: Balancer, name: str) -> float:
    value = balancer.metrics.registry.get_sample_value(name, {"pool": "api"})  # type: ignore[union-attr]
    return value or 0.0


def settled(balancer: Balancer) -> None:
    pool = balancer.pools["api"]
    assert pool.active_requests == 0
    assert pool.retries_active == 0 and pool.retries_waiting == 0
    assert all(b.active_requests == 0 for b in pool.backends)


def wait_for(condition: Any, timeout: float = 5.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_the_fast_answer_wins_and_the_slow_try_is_cancelled(serve, transport) -> None:
    slow, fast = Delayed("slow", 2.0), Delayed("fast", 0.0)
    server, balancer = hedged(
        serve, [serve(slow).url, serve(fast).url], transport, hedge={"after": 0.05}
    )
    answer = httpx.get(f"{server.url}/x", timeout=10)
    assert answer.status_code == 200 and answer.text == "fast"
    wait_for(lambda: slow.left == 1)  # the slow try's connection was closed, not pooled
    assert slow.answered == 0 and fast.answered == 1
    assert counted(balancer, "balancekit_hedges_total") == 1
    assert counted(balancer, "balancekit_hedge_wins_total") == 1
    settled(balancer)
    # The lost try's time so far is a lower bound of the slow backend's:
    # its average has heard of it, its percentiles (answers only) have not.
    first = balancer.pools["api"].backends[0]
    assert first.latency_ewma_ms is not None and first.latency_ewma_ms >= 50
    assert not first.recent_ms
    # The next request goes to the first backend again on a new connection.
    assert httpx.get(f"{server.url}/x", timeout=10).text == "fast"
    wait_for(lambda: slow.left == 2)
    settled(balancer)


def test_an_answer_before_after_starts_no_hedge(serve, transport) -> None:
    quick, other = Delayed("quick", 0.0), Delayed("other", 0.0)
    server, balancer = hedged(
        serve, [serve(quick).url, serve(other).url], transport, hedge={"after": 0.5}
    )
    for _ in range(5):
        assert httpx.get(f"{server.url}/x").text == "quick"
    assert other.began == 0
    assert counted(balancer, "balancekit_hedges_total") == 0
    settled(balancer)


def test_only_idempotent_requests_without_a_body_are_hedged(serve) -> None:
    slow, fast = Delayed("slow", 0.3), Delayed("fast", 0.0)
    server, balancer = hedged(
        serve, [serve(slow).url, serve(fast).url], "httptools", hedge={"after": 0.05}
    )
    assert httpx.post(f"{server.url}/x").text == "slow"  # not idempotent
    assert httpx.put(f"{server.url}/x", content=b"v").text == "slow"  # a body
    assert counted(balancer, "balancekit_hedges_total") == 0 and fast.began == 0
    assert httpx.delete(f"{server.url}/x").text == "fast"  # idempotent, no body: hedged
    assert counted(balancer, "balancekit_hedges_total") == 1
    settled(balancer)


def test_a_first_try_that_fails_leaves_the_race_to_the_hedge(serve, transport, raw_server):
    stalled: RawServer = raw_server("stall")
    # The hedge starts at 0.2 s and answers at 0.4 s; the first try times
    # out at 0.3 s, in between (each try has its own read timeout).
    late = Delayed("late", 0.2)
    server, balancer = hedged(
        serve,
        [stalled.url, serve(late).url],
        transport,
        hedge={"after": 0.2},
        timeouts={"read": 0.3},
    )
    answer = httpx.get(f"{server.url}/x", timeout=10)
    assert answer.status_code == 200 and answer.text == "late"
    pool = balancer.pools["api"]
    assert pool.backends[0].failures_total == 1  # the timed-out first try counted
    settled(balancer)


def test_hedges_count_against_the_retry_budget(serve) -> None:
    one, two = Delayed("one", 0.5), Delayed("two", 0.5)
    server, balancer = hedged(
        serve,
        [serve(one).url, serve(two).url],
        "httptools",
        hedge={"after": 0.05, "max": 1},
        retries={"budget_percent": 0},
    )

    async def many() -> list[int]:
        async with httpx.AsyncClient(timeout=10) as client:
            answers = await asyncio.gather(*(client.get(f"{server.url}/x") for _ in range(10)))
        return [a.status_code for a in answers]

    assert asyncio.run(many()) == [200] * 10
    # 10 slow requests at once, a budget of 0%: only the floor's worth hedge.
    assert counted(balancer, "balancekit_hedges_total") == RETRY_BUDGET_FLOOR
    assert two.began == RETRY_BUDGET_FLOOR
    settled(balancer)


@pytest.mark.parametrize(
    ("hedge", "where"),
    [
        ({"after": -0.1}, "pools.api.hedge.after"),
        ({"after": 0}, "pools.api.hedge.after"),
        ({"max": 0}, "pools.api.hedge.max"),
        ({"aftr": 0.1}, "pools.api.hedge.aftr"),
    ],
)
def test_bad_hedge_terms_are_config_errors(hedge: dict[str, Any], where: str) -> None:
    with pytest.raises(ConfigError, match=where.replace(".", r"\.")):
        Balancer({"pools": {"api": {"backends": ["http://127.0.0.1:1"], "hedge": hedge}}})
