"""Adaptive concurrency (CONTRACT section 16): the gradient controller on
its own with a hand-moved clock, then a real pool in front of a real
backend whose capacity the test sets: the limit falls when latency rises
under load and comes back once the backend can take more."""

from __future__ import annotations

import asyncio
import re
import statistics
import threading
import time
from typing import Any

import httpx
import pytest

from balancekit import Balancer, ConfigError
from balancekit._adaptive import INITIAL_LIMIT, MIN_RTT_INTERVAL, AdaptiveLimit
from balancekit.asgi import BalanceMiddleware
from tests.helpers import app_fallback
from tests.upstreams import complete_lifespan


def windows(limit: AdaptiveLimit, latency_ms: float, in_flight: int, count: int = 1) -> None:
    """``count`` windows in which requests took ``latency_ms`` with
    ``in_flight`` in flight."""
    for _ in range(count):
        start = limit.window_ends - limit.window
        for i in range(10):
            limit.sample(latency_ms, in_flight, start + i * limit.window / 10)
        limit.sample(latency_ms, in_flight, limit.window_ends)


def test_the_first_window_measures_the_minimum_rtt_at_min_limit() -> None:
    limit = AdaptiveLimit(3, 100, 1.0, now=0.0)
    assert (limit.measuring, limit.limit) == (True, 3)
    windows(limit, 10.0, 3)
    assert (limit.measuring, limit.min_rtt_ms, limit.limit) == (False, 10.0, INITIAL_LIMIT)


def test_the_limit_falls_as_latency_rises_and_grows_back_at_the_minimum() -> None:
    limit = AdaptiveLimit(2, 100, 1.0, now=0.0)
    windows(limit, 10.0, 2)
    before = limit.limit
    windows(limit, 40.0, before, count=4)  # queueing: 4x the minimum
    fallen = limit.limit
    assert fallen < before / 2
    windows(limit, 10.0, fallen, count=4)  # the backends keep up again
    assert limit.limit > 2 * fallen
    windows(limit, 11.0, 1000, count=50)  # jitter within the buffer: no fall
    assert limit.limit == 100  # up to max_limit, never past it


def test_an_idle_pool_does_not_raise_its_limit() -> None:
    limit = AdaptiveLimit(2, 1000, 1.0, now=0.0)
    windows(limit, 10.0, 2)
    windows(limit, 10.0, 1, count=20)  # one request at a time
    assert limit.limit == INITIAL_LIMIT


def test_the_minimum_is_measured_again_every_interval() -> None:
    limit = AdaptiveLimit(2, 1000, 1.0, now=0.0)
    windows(limit, 10.0, 2)
    windows(limit, 10.0, limit.limit, count=MIN_RTT_INTERVAL)
    assert (limit.measuring, limit.limit) == (True, 2)
    windows(limit, 30.0, 2)  # the backend is slower for good: a new baseline
    assert (limit.measuring, limit.min_rtt_ms) == (False, 30.0)
    assert limit.limit > 2


class Limited:
    """A backend of ``slots`` requests at once, each ``seconds`` long; the
    rest wait inside it, as in a server with a fixed worker count."""

    def __init__(self, slots: int, seconds: float) -> None:
        self.slots = slots  # the test may raise it while serving
        self.seconds = seconds
        self.busy = 0
        self.turns: asyncio.Condition | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await complete_lifespan(receive, send)
            return
        if self.turns is None:
            self.turns = asyncio.Condition()  # in the server's loop
        async with self.turns:
            await self.turns.wait_for(lambda: self.busy < self.slots)
            self.busy += 1
        try:
            await asyncio.sleep(self.seconds)
        finally:
            async with self.turns:
                self.busy -= 1
                self.turns.notify_all()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def watch(limit: AdaptiveLimit, seconds: float) -> list[int]:
    """The limit, read every 0.1 s for ``seconds``."""
    seen = []
    for _ in range(int(seconds * 10)):
        time.sleep(0.1)
        seen.append(limit.limit)
    return seen


def test_a_real_pool_finds_its_backends_capacity(serve) -> None:
    backend = Limited(slots=4, seconds=0.05)
    balancer = Balancer(
        {
            "pools": {
                "api": {
                    "backends": [serve(backend).url],
                    "adaptive_concurrency": {"min_limit": 2, "max_limit": 200, "window": 0.2},
                    "max_pending": 100,
                    "queue_timeout": 10,
                }
            },
            "routes": [{"prefix": "/", "pool": "api"}],
            "status": {"enabled": True},
        }
    )
    server = serve(BalanceMiddleware(app_fallback, balancer=balancer))
    limit = balancer.pools["api"].adaptive
    assert limit is not None
    stop = threading.Event()
    statuses: list[int] = []

    async def load(clients: int) -> None:
        async with httpx.AsyncClient(timeout=15) as client:

            async def one() -> None:
                deadline = time.monotonic() + 30  # bounded, whatever happens
                while not stop.is_set() and time.monotonic() < deadline:
                    statuses.append((await client.get(f"{server.url}/x")).status_code)

            await asyncio.gather(*(one() for _ in range(clients)))

    loader = threading.Thread(target=asyncio.run, args=(load(32),))
    loader.start()
    try:
        # 32 clients on 4 slots: latency rises and the limit falls, then
        # swings about the backend's capacity as the controller probes it.
        overloaded = watch(limit, seconds=3.0)
        status = httpx.get(f"{server.url}/balancekit/status.json").json()
        assert status["pools"]["api"]["concurrency_limit"] == limit.limit
        backend.slots = 64  # the backend scales out
        recovered = watch(limit, seconds=3.0)
    finally:
        stop.set()
        loader.join(timeout=30)
    print(f"\nadaptive limit, overloaded: {overloaded}; after scaling out: {recovered}")
    assert limit.min_rtt_ms is not None and limit.min_rtt_ms < 100
    low, high = statistics.median(overloaded[10:]), statistics.median(recovered[10:])
    assert low < INITIAL_LIMIT * 0.75, overloaded  # near the backend's 4 slots
    # Up again, until the next limit is this machine's CPU (the proxy and
    # the backend share two cores), not the backend's slots.
    assert high >= 2 * low, (overloaded, recovered)
    assert set(statuses) == {200}  # the queue held the excess: nothing refused
    metrics = httpx.get(f"{server.url}/balancekit/metrics").text
    assert 'balancekit_pool_concurrency_limit{pool="api"}' in metrics


def test_over_the_limit_without_a_queue_is_503(serve) -> None:
    backend = Limited(slots=100, seconds=0.3)
    balancer = Balancer(
        {
            "pools": {
                "api": {
                    "backends": [serve(backend).url],
                    "adaptive_concurrency": {"min_limit": 2, "max_limit": 2, "window": 10},
                }
            },
            "routes": [{"prefix": "/", "pool": "api"}],
        }
    )
    server = serve(BalanceMiddleware(app_fallback, balancer=balancer))

    async def five() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=10) as client:
            return list(await asyncio.gather(*(client.get(f"{server.url}/x") for _ in range(5))))

    answers = asyncio.run(five())
    assert sorted(a.status_code for a in answers) == [200, 200, 503, 503, 503]
    refused = next(a for a in answers if a.status_code == 503)
    assert "adaptive concurrency limit (2)" in refused.json()["detail"]


@pytest.mark.parametrize(
    ("table", "where"),
    [
        ({"min_limit": 10, "max_limit": 5}, "adaptive_concurrency.max_limit"),
        ({"min_limit": 0}, "adaptive_concurrency.min_limit"),
        ({"window": 0}, "adaptive_concurrency.window"),
        ({"windw": 1}, "adaptive_concurrency.windw"),
    ],
)
def test_bad_terms_are_config_errors(table: dict[str, Any], where: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(f"pools.api.{where}")):
        Balancer(
            {"pools": {"api": {"backends": ["http://127.0.0.1:1"], "adaptive_concurrency": table}}}
        )
