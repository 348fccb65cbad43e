from __future__ import annotations

import random
from collections import Counter

import pytest

from balancekit import Backend, RequestInfo
from balancekit._plugins import make_plugin_manager
from balancekit.algorithms import (
    ConsistentHash,
    First,
    LeastConnections,
    LeastResponseTime,
    Maglev,
    PowerOfTwoChoices,
    Random,
    RoundRobin,
    WeightedRandom,
    WeightedRoundRobin,
)
from balancekit.algorithms.maglev import build_table

REQUEST = RequestInfo("GET", "/")


def backends(*weights: int) -> list[Backend]:
    return [Backend(f"http://127.0.0.{i}:80", w) for i, w in enumerate(weights, start=1)]


def names(picks: list[Backend], pool: list[Backend]) -> str:
    return " ".join("abcdefgh"[pool.index(b)] for b in picks)


def registered_algorithms() -> list[type]:
    classes = make_plugin_manager(entry_points=False).classes("algorithm")
    return [cls for cls, _ in classes.values()]


all_algorithms = pytest.mark.parametrize(
    "algorithm_cls", registered_algorithms(), ids=lambda cls: cls.name
)


@all_algorithms
def test_picks_only_from_the_given_backends(algorithm_cls) -> None:
    algorithm = algorithm_cls()
    pool = backends(1, 2, 3)
    for size in (3, 2, 1, 3):
        offered = pool[:size]
        for _ in range(20):
            assert algorithm.pick(offered, REQUEST) in offered


@all_algorithms
def test_survives_a_backend_vanishing_between_calls(algorithm_cls) -> None:
    algorithm = algorithm_cls()
    pool = backends(1, 1, 1)
    for _ in range(5):
        algorithm.pick(pool, REQUEST)
    remaining = [pool[0], pool[2]]
    assert {algorithm.pick(remaining, REQUEST) for _ in range(30)} <= set(remaining)


def test_round_robin_takes_turns() -> None:
    pool = backends(1, 1, 1)
    algorithm = RoundRobin()
    assert names([algorithm.pick(pool, REQUEST) for _ in range(7)], pool) == "a b c a b c a"


def test_weighted_round_robin_is_nginx_smooth_sequence() -> None:
    pool = backends(5, 1, 1)
    algorithm = WeightedRoundRobin()
    picks = [algorithm.pick(pool, REQUEST) for _ in range(14)]
    assert names(picks, pool) == "a a b a c a a a a b a c a a"


def test_weighted_round_robin_shares_follow_weights() -> None:
    pool = backends(3, 2, 1)
    algorithm = WeightedRoundRobin()
    counts = Counter(algorithm.pick(pool, REQUEST).url for _ in range(6000))
    assert [counts[b.url] for b in pool] == [3000, 2000, 1000]


def test_random_honours_an_injected_rng_and_is_uniform() -> None:
    pool = backends(5, 1, 1)

    def picks(seed: int) -> list[str]:
        algorithm = Random(rng=random.Random(seed))
        return [algorithm.pick(pool, REQUEST).url for _ in range(50)]

    # 50 picks of 3: equal by chance once in 3**50 if the rng were ignored.
    assert picks(7) == picks(7)
    assert picks(7) != picks(8)
    algorithm = Random(rng=random.Random(1))
    counts = Counter(algorithm.pick(pool, REQUEST).url for _ in range(30000))
    for backend in pool:
        assert abs(counts[backend.url] / 30000 - 1 / 3) < 0.01


def with_key(value: str | None, name: str = "X-User") -> RequestInfo:
    headers = [] if value is None else [(name.lower().encode(), value.encode())]
    return RequestInfo("GET", "/", headers=headers, client_ip="198.51.100.7")


def test_weighted_random_shares_follow_weights() -> None:
    pool = backends(5, 3, 2)
    algorithm = WeightedRandom(rng=random.Random(3))
    picks = 100_000
    counts = Counter(algorithm.pick(pool, REQUEST).url for _ in range(picks))
    for backend, share in zip(pool, (0.5, 0.3, 0.2), strict=True):
        assert abs(counts[backend.url] / picks - share) < 0.01


def test_least_connections_prefers_fewest_in_flight_per_weight_and_rotates_ties() -> None:
    pool = backends(1, 1, 2)
    algorithm = LeastConnections()
    pool[0].active_requests, pool[1].active_requests, pool[2].active_requests = 3, 1, 4
    assert algorithm.pick(pool, REQUEST) is pool[1]  # 1/1 < 4/2 < 3/1
    for b in pool:
        b.active_requests = 0
    assert {algorithm.pick(pool, REQUEST).url for _ in range(6)} == {b.url for b in pool}


def test_least_response_time_tries_unsampled_first_then_the_fastest() -> None:
    now = [100.0]
    pool = backends(1, 1, 1)
    algorithm = LeastResponseTime(clock=lambda: now[0])
    for backend, ms in zip(pool[:2], (50.0, 5.0), strict=True):
        backend.record_latency(ms)
        backend.latency_at = now[0]
    assert algorithm.pick(pool, REQUEST) is pool[2]  # no sample yet
    pool[2].record_latency(20.0)
    pool[2].latency_at = now[0]
    assert {algorithm.pick(pool, REQUEST).url for _ in range(5)} == {pool[1].url}


def test_a_fast_failing_backend_does_not_attract_traffic() -> None:
    pool = backends(1, 1)
    pool[0].record_latency(40.0)
    pool[1].record_latency(1.0, failed=True)  # failed in 1 ms
    algorithm = LeastResponseTime(clock=lambda: pool[0].latency_at)
    assert algorithm.pick(pool, REQUEST) is pool[0]


def test_stale_samples_age_so_a_recovered_backend_is_tried_again() -> None:
    now = [0.0]
    pool = backends(1, 1)
    algorithm = LeastResponseTime(decay=10.0, clock=lambda: now[0])
    pool[0].record_latency(500.0)
    pool[0].latency_at = 0.0
    pool[1].record_latency(20.0)
    pool[1].latency_at = 60.0
    now[0] = 60.0
    # 500 ms sixty seconds ago counts as 500 / 2**6 < 20 ms now
    assert algorithm.pick(pool, REQUEST) is pool[0]


def test_p2c_prefers_the_less_loaded_faster_backend() -> None:
    pool = backends(1, 1)
    for backend in pool:
        backend.record_latency(10.0)
    pool[0].active_requests = 5
    algorithm = PowerOfTwoChoices(rng=random.Random(1), clock=lambda: pool[1].latency_at)
    assert {algorithm.pick(pool, REQUEST).url for _ in range(20)} == {pool[1].url}


@pytest.mark.parametrize("cls", [ConsistentHash, Maglev], ids=["consistent_hash", "maglev"])
def test_hashing_is_sticky_and_remaps_about_one_nth(cls) -> None:
    pool = [Backend(f"http://10.0.1.{i}:80") for i in range(10)]
    algorithm = cls(key="header:X-User")
    keys = [f"user-{i}" for i in range(10_000)]
    before = {k: algorithm.pick(pool, with_key(k)).url for k in keys}
    assert before == {k: algorithm.pick(pool, with_key(k)).url for k in keys}
    shares = Counter(before.values())
    assert min(shares.values()) > 10_000 / 10 * 0.5
    smaller = pool[:3] + pool[4:]
    after = {k: algorithm.pick(smaller, with_key(k)).url for k in keys}
    moved = sum(1 for k in keys if before[k] != after[k])
    lost = sum(1 for k in keys if before[k] == pool[3].url)
    assert moved >= lost  # every key of the removed backend moved
    assert moved / len(keys) < 1 / 10 * 1.6  # and few others did


@pytest.mark.parametrize("cls", [ConsistentHash, Maglev], ids=["consistent_hash", "maglev"])
def test_hashing_without_the_key_spreads_evenly(cls) -> None:
    pool = backends(1, 1, 1)
    algorithm = cls(key="header:X-User")
    assert {algorithm.pick(pool, with_key(None)).url for _ in range(6)} == {b.url for b in pool}


def test_hash_mapping_is_the_same_in_another_process() -> None:
    import json
    import subprocess
    import sys

    code = (
        "import json; from balancekit import Backend, RequestInfo;"
        "from balancekit.algorithms import ConsistentHash, Maglev;"
        "pool = [Backend(f'http://10.0.1.{i}:80') for i in range(7)];"
        "r = lambda k: RequestInfo('GET', '/', headers=[(b'x-user', k.encode())]);"
        "algs = [c(key='header:X-User') for c in (ConsistentHash, Maglev)];"
        "print(json.dumps([[a.pick(pool, r(f'u{i}')).url for i in range(200)] for a in algs]))"
    )
    runs = [
        json.loads(
            subprocess.run(
                [sys.executable, "-c", code], capture_output=True, text=True, check=True
            ).stdout
        )
        for _ in range(2)
    ]
    assert runs[0] == runs[1]


def test_bounded_load_spills_to_the_next_backend() -> None:
    pool = [Backend(f"http://10.0.2.{i}:80") for i in range(4)]
    algorithm = ConsistentHash(key="header:X-User", bounded_load=1.25)
    home = algorithm.pick(pool, with_key("hot"))
    home.active_requests = 10  # far above 1.25 x the mean
    assert algorithm.pick(pool, with_key("hot")) is not home


@pytest.mark.parametrize(
    ("options", "message"),
    [
        pytest.param({"key": "nope"}, "key: must be", id="bad-key"),
        pytest.param({"bounded_load": 0.5}, "bounded_load: must be", id="bad-bound"),
    ],
)
def test_hash_options_are_checked(options, message) -> None:
    with pytest.raises(ValueError, match=message):
        ConsistentHash(**options)


def test_maglev_weights() -> None:
    pool = backends(3, 1)
    table = Counter(build_table(pool, 65537))
    assert abs(table[0] / sum(table.values()) - 0.75) < 0.01


def test_first_takes_the_first_eligible_in_order() -> None:
    pool = backends(1, 1, 1)
    assert First().pick(pool, REQUEST) is pool[0]
    assert First().pick(pool[1:], REQUEST) is pool[1]
