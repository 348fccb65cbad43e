from __future__ import annotations

import logging
import threading
import time
from collections import Counter

import pytest

from balancekit import BackendState, Balancer, ConfigError, NoEligibleBackend, RequestInfo, hookimpl
from balancekit._plugins import make_plugin_manager

REQUEST = RequestInfo("GET", "/")
A, B, C = "http://127.0.0.1:9001", "http://127.0.0.1:9002", "http://127.0.0.1:9003"


def make_pool(*backends, clock=time.monotonic, **settings):
    config = {"pools": {"api": {"backends": list(backends), **settings}}}
    manager = make_plugin_manager(entry_points=False)
    return Balancer(config, plugin_manager=manager, clock=clock).pools["api"]


def picks(pool, n):
    out = []
    for _ in range(n):
        backend = pool.acquire(REQUEST)
        pool.release(backend, ok=True, latency_ms=1.0)
        out.append(backend.url)
    return out


def test_backups_only_when_no_primary_is_eligible() -> None:
    pool = make_pool(A, {"url": B, "backup": True})
    assert set(picks(pool, 4)) == {A}
    pool.disable(A)
    assert set(picks(pool, 4)) == {B}
    pool.enable(A)
    assert set(picks(pool, 4)) == {A}


def test_drain_disable_enable() -> None:
    pool = make_pool(A, B)
    pool.drain(A)
    assert pool.backend(A).state is BackendState.DRAINING
    assert set(picks(pool, 4)) == {B}
    pool.disable(B)
    with pytest.raises(NoEligibleBackend) as info:
        pool.acquire(REQUEST)
    assert info.value.pool == "api"
    assert "127.0.0.1" not in str(info.value)
    pool.enable(A)
    pool.enable(B)
    assert set(picks(pool, 4)) == {A, B}


def test_state_precedence() -> None:
    pool = make_pool(A)
    backend = pool.backend(A)
    states = []
    pool.set_healthy(backend, False)
    states.append(backend.state)
    pool.drain(A)
    states.append(backend.state)
    pool.disable(A)
    states.append(backend.state)
    assert states == [BackendState.UNHEALTHY, BackendState.DRAINING, BackendState.DISABLED]


def test_max_connections_makes_a_backend_ineligible_while_full() -> None:
    pool = make_pool(A, B, max_connections=2)
    held = [pool.acquire(REQUEST) for _ in range(4)]
    assert Counter(b.url for b in held) == {A: 2, B: 2}
    with pytest.raises(NoEligibleBackend):
        pool.acquire(REQUEST)
    pool.release(held[0], ok=True, latency_ms=1)
    assert pool.acquire(REQUEST).url == held[0].url


def test_add_and_remove_at_runtime() -> None:
    pool = make_pool(A)
    pool.add_backend(B, weight=2)
    assert set(picks(pool, 4)) == {A, B}
    in_flight = pool.acquire(REQUEST)
    pool.remove_backend(in_flight.url)
    assert in_flight.url not in {b.url for b in pool.backends}
    # the request in flight finishes normally on the removed backend
    pool.release(in_flight, ok=True, latency_ms=3)
    assert in_flight.requests_total >= 1 and in_flight.active_requests == 0
    assert pool.active_requests == 0
    with pytest.raises(ConfigError, match="weight: must be a positive integer"):
        pool.add_backend(C, weight=0)
    with pytest.raises(ValueError, match="already has"):
        pool.add_backend(pool.backends[0].url)
    with pytest.raises(KeyError):
        pool.drain("http://nowhere:1")


def test_exclude_skips_the_backend_that_just_failed() -> None:
    pool = make_pool(A, B)
    failed = [pool.backend(A)]
    for _ in range(5):
        backend = pool.acquire(REQUEST, exclude=failed)
        assert backend.url == B
        pool.release(backend, ok=True, latency_ms=1)
    pool.disable(B)
    assert pool.acquire(REQUEST, exclude=failed).url == A  # better than nothing


def test_exclude_skips_every_backend_tried_while_another_is_eligible() -> None:
    pool = make_pool(A, B, C)
    tried = [pool.backend(A), pool.backend(B)]
    for _ in range(5):
        backend = pool.acquire(REQUEST, exclude=tried)
        assert backend.url == C
        pool.release(backend, ok=True, latency_ms=1)
    tried.append(pool.backend(C))
    picked = {pool.acquire(REQUEST, exclude=tried).url for _ in range(3)}
    assert picked == {A, B, C}  # all tried: any of them rather than none


def test_outlier_ejection_doubles_and_expires() -> None:
    now = [1000.0]
    pool = make_pool(
        A,
        B,
        C,
        outlier_detection={
            "consecutive_failures": 2,
            "base_ejection_time": 10,
            "max_ejection_time": 15,
            "max_ejection_percent": 50,
        },
    )
    pool._clock = lambda: now[0]
    a = pool.backend(A)

    def fail_twice():
        for _ in range(2):
            pool.backends  # noqa: B018
            a.active_requests += 1
            pool.active_requests += 1
            pool.release(a, ok=False, latency_ms=1)

    fail_twice()
    assert a.state is BackendState.EJECTED and a.ejected_until == 1010.0
    assert A not in set(picks(pool, 6))
    now[0] = 1010.0
    assert A in set(picks(pool, 6))
    fail_twice()
    assert a.ejected_until == 1010.0 + 15  # 20 s, capped at 15
    b = pool.backend(B)
    for _ in range(2):
        b.active_requests += 1
        pool.active_requests += 1
        pool.release(b, ok=False, latency_ms=1)
    assert b.state is BackendState.HEALTHY  # a second ejection would pass 50%


def test_retry_budget_has_a_floor_of_three() -> None:
    pool = make_pool(A, retries={"attempts": 3, "budget_percent": 20})
    assert [pool.try_acquire_retry() for _ in range(4)] == [True, True, True, False]
    pool.release_retry()
    assert pool.try_acquire_retry()


def test_retry_budget_counts_requests_between_tries_and_takes_a_routes_percent() -> None:
    pool = make_pool(A, retries={"attempts": 3, "budget_percent": 50})
    pool.active_requests = 8  # requests holding a backend
    # Each granted retry backs off first, holding no backend, yet its
    # request is still the pool's: 50% of 8, 9, 10, ... requests.
    assert [pool.try_acquire_retry() for _ in range(9)] == [True] * 8 + [False]
    assert pool.retries_waiting == 8
    pool.retry_began()  # one retry's try has its backend
    pool.active_requests += 1
    pool.release_retry()
    for _ in range(7):
        pool.release_retry(began=False)  # the others ended before they began
    assert pool.retries_active == 0 and pool.retries_waiting == 0
    # A route's own percent, against the same places; the floor still holds.
    assert [pool.try_acquire_retry(budget_percent=10) for _ in range(4)] == [True] * 3 + [False]


def test_state_changes_reach_the_hook_and_a_broken_observer_is_contained() -> None:
    seen = []

    class Observer:
        @hookimpl
        def balancekit_backend_state_changed(self, pool, backend, old, new):
            seen.append((pool.name, backend.url, old, new))

    class Broken:
        @hookimpl
        def balancekit_backend_state_changed(self, pool, backend, old, new):
            raise RuntimeError("observer bug")

    manager = make_plugin_manager(entry_points=False)
    manager.pm.register(Observer())
    manager.pm.register(Broken())
    pool = Balancer({"pools": {"api": {"backends": [A]}}}, plugin_manager=manager).pools["api"]
    pool.drain(A)
    pool.enable(A)
    assert seen == [
        ("api", A, BackendState.HEALTHY, BackendState.DRAINING),
        ("api", A, BackendState.DRAINING, BackendState.HEALTHY),
    ]


def test_one_balancer_shared_by_threads_counts_every_request() -> None:
    pool = make_pool(A, B, C, algorithm="weighted_round_robin")
    threads, per_thread = 8, 5000
    barrier = threading.Barrier(threads)

    def work():
        barrier.wait()
        for i in range(per_thread):
            backend = pool.acquire(REQUEST)
            pool.release(backend, ok=i % 10 != 0, latency_ms=1.0)

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    total = threads * per_thread
    assert sum(b.requests_total for b in pool.backends) == total
    assert sum(b.failures_total for b in pool.backends) == total // 10
    assert all(b.active_requests == 0 for b in pool.backends)
    assert pool.active_requests == 0
    # smooth WRR with equal weights under contention still splits exactly
    assert {b.requests_total for b in pool.backends} == {total // 3, total // 3 + 1}


def test_status_shape() -> None:
    balancer = Balancer({"pools": {"api": {"backends": [A, {"url": B, "weight": 2}]}}})
    status = balancer.status()
    backend = status["pools"]["api"]["backends"][1]
    assert status["pools"]["api"]["algorithm"] == "round_robin"
    assert {
        "url",
        "state",
        "weight",
        "active_requests",
        "requests_total",
        "failures_total",
        "latency_ewma_ms",
    } <= backend.keys()
    assert (backend["url"], backend["state"], backend["weight"]) == (B, "healthy", 2)
    assert backend["latency_ewma_ms"] is None


D = "http://127.0.0.1:9004"


def test_panic_mode_spreads_over_all_when_too_few_are_eligible(
    caplog: pytest.LogCaptureFixture,
) -> None:
    pool = make_pool(A, B, C, D)  # panic_threshold = 50 by default
    with caplog.at_level(logging.INFO, logger="balancekit"):
        for url in (A, B):
            pool.set_healthy(pool.backend(url), False)
        assert not pool.panic  # 2 of 4 is not under 50%
        assert set(picks(pool, 8)) == {C, D}
        pool.set_healthy(pool.backend(C), False)
        assert pool.panic and pool.status()["panic"] is True
        # one healthy backend would take everything: spread over all four
        assert Counter(picks(pool, 8)) == {A: 2, B: 2, C: 2, D: 2}
        pool.set_healthy(pool.backend(A), True)
        assert not pool.panic
        assert set(picks(pool, 8)) == {A, D}
    lines = [r.getMessage() for r in caplog.records if "panic" in r.getMessage()]
    assert len(lines) == 2 and "balancing over all 4" in lines[0] and "over" in lines[1]


def test_panic_counts_only_backends_left_in_service() -> None:
    pool = make_pool(A, B, C, D)
    pool.drain(A)
    pool.disable(B)  # an operator's choice, not an outage
    pool.set_healthy(pool.backend(C), False)
    assert not pool.panic  # 1 of the 2 in service
    assert set(picks(pool, 4)) == {D}
    pool.set_healthy(pool.backend(D), False)
    assert pool.panic
    assert set(picks(pool, 4)) == {C, D}  # never the drained or disabled ones


def test_backups_take_over_before_panic_and_threshold_zero_turns_it_off() -> None:
    pool = make_pool(A, B, {"url": C, "backup": True})
    for url in (A, B):
        pool.set_healthy(pool.backend(url), False)
    assert not pool.panic and set(picks(pool, 4)) == {C}
    pool.set_healthy(pool.backend(C), False)
    assert pool.panic and set(picks(pool, 4)) == {A, B}

    off = make_pool(A, B, panic_threshold=0)
    for url in (A, B):
        off.set_healthy(off.backend(url), False)
    assert not off.panic
    with pytest.raises(NoEligibleBackend):
        off.acquire(REQUEST)


def test_slow_start_ramps_a_returning_backend_linearly() -> None:
    now = [0.0]
    pool = make_pool(A, B, algorithm="weighted_round_robin", slow_start=10, clock=lambda: now[0])
    a, b = pool.backend(A), pool.backend(B)
    assert b.effective_weight == 1  # the configured backends start at full weight
    pool.set_healthy(b, False)
    pool.set_healthy(b, True)
    ramp = []
    for t in (0.0, 2.5, 5.0, 7.5, 9.9, 10.0, 30.0):
        now[0] = t
        shares = Counter(picks(pool, 400))
        ramp.append((b.effective_weight, shares[B] / 400))
    assert [w for w, _ in ramp] == [0.1, 0.25, 0.5, 0.75, pytest.approx(0.99), 1, 1]
    # its share of traffic follows: weight / (weight + 1)
    for weight, share in ramp:
        assert share == pytest.approx(weight / (weight + a.effective_weight), abs=0.01)
    assert pool.status()["backends"][1]["effective_weight"] == 1


def test_slow_start_for_added_backends_and_least_connections() -> None:
    now = [0.0]
    pool = make_pool(A, algorithm="least_connections", slow_start=20, clock=lambda: now[0])
    pool.add_backend(B)
    held = [pool.acquire(REQUEST) for _ in range(22)]
    # in-flight per effective weight stays level: A 1.0, B 0.1 -> 20 and 2
    assert Counter(b.url for b in held) == {A: 20, B: 2}
    for backend in held:
        pool.release(backend, ok=True, latency_ms=1)
    now[0] = 20.0
    held = [pool.acquire(REQUEST) for _ in range(20)]
    assert Counter(b.url for b in held) == {A: 10, B: 10}
    for backend in held:
        pool.release(backend, ok=True, latency_ms=1)


def test_slow_start_is_off_by_default() -> None:
    pool = make_pool(A, B)
    pool.set_healthy(pool.backend(B), False)
    pool.set_healthy(pool.backend(B), True)
    assert pool.backend(B).effective_weight == 1
