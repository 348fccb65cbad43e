from __future__ import annotations

import random
from collections import Counter

import pytest

from balancekit import Backend, RequestInfo
from balancekit._plugins import make_plugin_manager
from balancekit.algorithms import Random, RoundRobin, WeightedRoundRobin

REQUEST = RequestInfo("GET", "/")


def backends(*weights: int) -> list[Backend]:
    return [Backend(f"http://10.0.0.{i}:80", w) for i, w in enumerate(weights, start=1)]


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
    first = [Random(rng=random.Random(7)).pick(pool, REQUEST) for _ in range(1)]
    again = [Random(rng=random.Random(7)).pick(pool, REQUEST) for _ in range(1)]
    assert first == again
    algorithm = Random(rng=random.Random(1))
    counts = Counter(algorithm.pick(pool, REQUEST).url for _ in range(30000))
    for backend in pool:
        assert abs(counts[backend.url] / 30000 - 1 / 3) < 0.01
