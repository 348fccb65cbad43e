"""``least_response_time`` weighs the moving average by (in-flight + 1), as
NGINX's ``least_time`` weighs with active connections, so it spreads
requests under concurrency instead of herding them onto the backend that
looked fastest, while a faster backend still gets more.

Requests are held in flight on a real pool (acquire now, release later);
the pool's feedback keeps the algorithm's heap in step, and every pick is
checked against the literal rule.
"""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest

from balancekit import Balancer, RequestInfo
from balancekit._backend import Backend
from balancekit._plugins import make_plugin_manager
from balancekit.algorithms import LeastResponseTime
from balancekit.algorithms.least_response_time import effective_latency, load_score

REQUEST = RequestInfo("GET", "/")


class Clock:
    def __init__(self, now: float = 500.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_pool(n, clock, decay=10.0):
    config = {
        "pools": {
            "api": {
                "algorithm": {"name": "least_response_time", "decay": decay},
                "backends": [f"http://10.3.0.{i + 1}:80" for i in range(n)],
            }
        }
    }
    manager = make_plugin_manager(entry_points=False)
    return Balancer(config, plugin_manager=manager, clock=clock).pools["api"]


def sample(pool, latencies):
    """Give each backend one sample: ``latencies[i]`` ms for backend i."""
    held = [pool.acquire(REQUEST) for _ in latencies]  # unsampled: each once, in turn
    assert set(held) == set(pool.backends)
    for backend in held:
        pool.release(backend, ok=True, latency_ms=latencies[pool.backends.index(backend)])


def literal_best(backends, now, decay):
    return min(effective_latency(b, now, decay) * (b.active_requests + 1) for b in backends)


def test_equal_averages_spread_over_every_backend_under_concurrency():
    clock = Clock()
    pool = make_pool(4, clock)
    sample(pool, [10.0] * 4)
    held = [pool.acquire(REQUEST) for _ in range(12)]
    # the average alone would send all twelve to one backend
    assert Counter(held) == dict.fromkeys(pool.backends, 3)


def test_in_flight_requests_push_picks_off_a_slightly_faster_backend():
    clock = Clock()
    pool = make_pool(3, clock)
    sample(pool, [9.0, 10.0, 10.0])
    first = pool.acquire(REQUEST)
    assert first is pool.backends[0]  # fastest and idle
    second = pool.acquire(REQUEST)
    assert second is not first  # 9 x 2 > 10 x 1
    pool.release(second, ok=True, latency_ms=None)
    pool.release(first, ok=True, latency_ms=None)  # no sample: the average stays
    assert pool.acquire(REQUEST) is pool.backends[0]  # idle again, it wins again


def test_a_lower_bound_raises_the_average_and_never_lowers_it():
    # A hedge's cancelled loser: "slower than this" is all its time says.
    clock = Clock()
    pool = make_pool(2, clock)
    fresh, known = pool.backends
    for backend in (fresh, known):
        pool.acquire(REQUEST, exclude=[b for b in pool.backends if b is not backend])
    pool.release(fresh, ok=True, latency_ms=40.0, at_least=True)
    assert fresh.latency_ewma_ms == 40.0  # no average yet: the bound is all there is
    pool.release(known, ok=True, latency_ms=100.0)
    before = known.latency_ewma_ms
    pool.acquire(REQUEST, exclude=[fresh])
    pool.release(known, ok=True, latency_ms=30.0, at_least=True)
    assert known.latency_ewma_ms == before  # below the average: no news
    pool.acquire(REQUEST, exclude=[fresh])
    pool.release(known, ok=True, latency_ms=300.0, at_least=True)
    assert before is not None and known.latency_ewma_ms > before
    assert list(known.recent_ms) == [100.0] and not fresh.recent_ms  # answers only
    assert pool.active_requests == 0 and known.failures_total == 0


def test_a_faster_backend_still_gets_more():
    clock = Clock()
    pool = make_pool(3, clock)
    sample(pool, [10.0, 20.0, 40.0])
    held = [pool.acquire(REQUEST) for _ in range(14)]
    counts = Counter(b.url for b in held)
    a, b, c = (counts[backend.url] for backend in pool.backends)
    # 10 x (a + 1), 20 x (b + 1), 40 x (c + 1) kept level: 8, 4 and 2
    assert (a, b, c) == (8, 4, 2)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_every_pick_is_the_lowest_decayed_average_times_in_flight(seed):
    rng = random.Random(seed)
    clock = Clock()
    decay = 2.0
    pool = make_pool(6, clock, decay=decay)
    sample(pool, [rng.uniform(5, 50) for _ in range(6)])
    held: list[Backend] = []
    for _ in range(3000):
        clock.now += rng.uniform(0, 0.05)
        if held and (len(held) > 40 or rng.random() < 0.45):
            backend = held.pop(rng.randrange(len(held)))
            pool.release(backend, ok=rng.random() > 0.05, latency_ms=rng.uniform(1, 80))
            continue
        candidates = list(pool.backends)
        backend = pool.acquire(REQUEST)
        # scores before this pick counted it: compare as they were
        backend.active_requests -= 1
        best = literal_best(candidates, clock.now, decay)
        score = effective_latency(backend, clock.now, decay) * (backend.active_requests + 1)
        backend.active_requests += 1
        assert math.isclose(score, best, rel_tol=1e-9)
        held.append(backend)
    for backend in held:
        pool.release(backend, ok=True, latency_ms=5.0)


def test_a_retry_subset_is_scanned_by_the_same_score():
    clock = Clock()
    pool = make_pool(3, clock)
    sample(pool, [10.0, 10.0, 30.0])
    a, b, c = pool.backends
    held = [pool.acquire(REQUEST) for _ in range(2)]
    assert set(held) == {a, b}
    # without a: b has one in flight (10 x 2) and c none (30 x 1)
    assert pool.acquire(REQUEST, exclude=[a]) is b
    # now b has two (10 x 3 = 30): a tie with c, and then c wins
    assert pool.acquire(REQUEST, exclude=[a]) in (b, c)


def test_picking_from_a_plain_list_weighs_in_flight_too():
    backends = [Backend(f"http://10.4.0.{i}:80") for i in (1, 2, 3)]
    for backend, ms in zip(backends, (10.0, 12.0, 50.0), strict=True):
        backend.record_latency(ms, at=100.0)
    algorithm = LeastResponseTime(clock=lambda: 100.0)
    assert algorithm.pick(backends, REQUEST) is backends[0]
    backends[0].active_requests = 1  # 10 x 2 > 12 x 1
    assert algorithm.pick(backends, REQUEST) is backends[1]
    backends[1].active_requests = 5  # 12 x 6 = 72 > 50 > 10 x 2
    assert algorithm.pick(backends, REQUEST) is backends[0]
    backends[0].active_requests = 9  # 10 x 10 = 100 > 50 x 1
    assert algorithm.pick(backends, REQUEST) is backends[2]


def test_backends_without_samples_still_go_first_whatever_the_load():
    backends = [Backend(f"http://10.5.0.{i}:80") for i in (1, 2)]
    backends[0].record_latency(1.0, at=0.0)
    backends[1].active_requests = 50
    assert load_score(backends[1], 0.0, 10.0) < load_score(backends[0], 0.0, 10.0)
    assert LeastResponseTime(clock=lambda: 0.0).pick(backends, REQUEST) is backends[1]
