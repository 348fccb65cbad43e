"""The fast structures behind the algorithms, checked against the plain rule.

Weighted round robin, least connections and least response time keep a heap
or buckets updated through the pool's feedback instead of scanning every
backend per pick; consistent hash and Maglev keep their table over every
backend seen and skip the ineligible ones. Each is driven here through a
real Pool, with membership and state changing under it, and every pick is
compared with what the literal rule would choose at that moment.
"""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest

from balancekit import Balancer, RequestInfo
from balancekit._backend import Backend
from balancekit._plugins import make_plugin_manager
from balancekit._pool import Pool
from balancekit.algorithms.least_response_time import effective_latency

REQUEST = RequestInfo("GET", "/")


def make_pool(algorithm: str | dict, weights: list[int]) -> Pool:
    config = {
        "pools": {
            "p": {
                "algorithm": algorithm,
                "backends": [
                    {"url": f"http://10.1.0.{i + 1}:80", "weight": w} for i, w in enumerate(weights)
                ],
            }
        }
    }
    return Balancer(config, plugin_manager=make_plugin_manager(entry_points=False)).pools["p"]


def eligible(pool: Pool) -> list[Backend]:
    return [b for b in pool.backends if b.state.value == "healthy" and not b.backup]


def shake(pool: Pool, rng: random.Random, step: int) -> None:
    """Now and then, change who is eligible: what health checks and operators do."""
    if step % 37 == 0:
        backend = rng.choice(pool.backends)
        if backend.enabled and len(eligible(pool)) > 1:
            pool.disable(backend.url)
        else:
            pool.enable(backend.url)
    if step % 101 == 0:
        pool.add_backend(f"http://10.2.0.{step // 101}:80", weight=rng.randint(1, 4))
    if step % 149 == 0 and len(eligible(pool)) > 2:
        pool.remove_backend(rng.choice(eligible(pool)).url)


class NginxWeightedRoundRobin:
    """ngx_http_upstream_get_peer, literally: the reference sequence."""

    def __init__(self) -> None:
        self.current: dict[str, int] = {}

    def pick(self, backends: list[Backend]) -> Backend:
        total, best = 0, None
        for backend in backends:
            self.current[backend.url] = self.current.get(backend.url, 0) + backend.weight
            total += backend.weight
            if best is None or self.current[backend.url] > self.current[best.url]:
                best = backend
        assert best is not None
        self.current[best.url] -= total
        return best


def test_weighted_round_robin_gives_nginx_sequence_through_the_pool() -> None:
    pool = make_pool("weighted_round_robin", [5, 1, 1])
    picks = []
    for _ in range(14):
        backend = pool.acquire(REQUEST)
        pool.release(backend, ok=True, latency_ms=1.0)
        picks.append("abc"[pool.backends.index(backend)])
    assert " ".join(picks) == "a a b a c a a a a b a c a a"


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_weighted_round_robin_matches_nginx_while_membership_changes(seed: int) -> None:
    rng = random.Random(seed)
    pool = make_pool("weighted_round_robin", [rng.randint(1, 6) for _ in range(9)])
    reference = NginxWeightedRoundRobin()
    for step in range(1, 1500):
        shake(pool, rng, step)
        expected = reference.pick(eligible(pool))
        backend = pool.acquire(REQUEST)
        pool.release(backend, ok=True, latency_ms=1.0)
        assert backend is expected, f"pick {step} differs from NGINX's"


def test_weighted_round_robin_retry_excluding_a_backend_keeps_the_sequence() -> None:
    pool = make_pool("weighted_round_robin", [3, 2, 1])
    reference = NginxWeightedRoundRobin()
    for step in range(200):
        exclude = pool.backends[step % 3] if step % 5 == 0 else None
        offered = [b for b in pool.backends if b is not exclude]
        expected = reference.pick(offered)
        backend = pool.acquire(REQUEST, exclude=() if exclude is None else [exclude])
        pool.release(backend, ok=True, latency_ms=1.0)
        assert backend is expected


@pytest.mark.parametrize("seed", [4, 5])
def test_least_connections_picks_the_lowest_load_per_weight(seed: int) -> None:
    rng = random.Random(seed)
    pool = make_pool("least_connections", [rng.randint(1, 3) for _ in range(12)])
    held: list[Backend] = []
    for step in range(1, 2000):
        shake(pool, rng, step)
        if held and rng.random() < 0.45:
            pool.release(held.pop(rng.randrange(len(held))), ok=True, latency_ms=1.0)
            continue
        lowest = min(b.active_requests / b.weight for b in eligible(pool))
        backend = pool.acquire(REQUEST)
        held.append(backend)
        assert math.isclose((backend.active_requests - 1) / backend.weight, lowest)
    for backend in held:
        pool.release(backend, ok=True, latency_ms=1.0)


def test_least_connections_spreads_ties_in_turn() -> None:
    pool = make_pool("least_connections", [1, 1, 1, 1])
    urls = []
    for _ in range(8):
        backend = pool.acquire(REQUEST)
        pool.release(backend, ok=True, latency_ms=1.0)
        urls.append(backend.url)
    assert Counter(urls) == {b.url: 2 for b in pool.backends}


@pytest.mark.parametrize("seed", [6, 7])
def test_least_response_time_picks_the_lowest_decayed_average(seed: int) -> None:
    rng = random.Random(seed)
    pool = make_pool({"name": "least_response_time", "decay": 0.5}, [1] * 10)
    for step in range(1, 1500):
        shake(pool, rng, step)
        candidates = eligible(pool)
        unsampled = [b for b in candidates if b.latency_ewma_ms is None]
        backend = pool.acquire(REQUEST)
        if unsampled:
            assert backend in unsampled
        else:
            # any common instant after the last sample orders them alike
            now = max(b.latency_at for b in candidates)
            best = min(effective_latency(b, now, 0.5) for b in candidates)
            assert math.isclose(effective_latency(backend, now, 0.5), best, rel_tol=1e-9)
        pool.release(backend, ok=rng.random() > 0.05, latency_ms=rng.uniform(1, 80))


def test_unsampled_backends_are_tried_in_turn() -> None:
    pool = make_pool("least_response_time", [1, 1, 1])
    held = [pool.acquire(REQUEST) for _ in range(3)]
    assert len(set(held)) == 3  # none has a sample yet: each tried once, not one thrice
    for backend in held:
        pool.release(backend, ok=True, latency_ms=5.0)


def keyed(i: int) -> RequestInfo:
    return RequestInfo("GET", "/", headers=[(b"x-user", f"user-{i}".encode())])


@pytest.mark.parametrize("name", ["consistent_hash", "maglev"])
def test_an_ineligible_backend_moves_only_its_own_keys(name: str) -> None:
    pool = make_pool({"name": name, "key": "header:X-User"}, [1, 2, 1, 1, 3])

    def mapping() -> dict[int, Backend]:
        out = {}
        for i in range(3000):
            backend = pool.acquire(keyed(i))
            pool.release(backend, ok=True, latency_ms=1.0)
            out[i] = backend
        return out

    before = mapping()
    gone = pool.backends[1]
    pool.disable(gone.url)
    after = mapping()
    moved = {i for i in before if before[i] is not after[i]}
    assert moved == {i for i in before if before[i] is gone}
    # its keys spread over the others rather than piling onto one
    assert len({after[i] for i in moved}) == 4
    pool.enable(gone.url)
    assert mapping() == before


@pytest.mark.parametrize("name", ["consistent_hash", "maglev"])
def test_tables_follow_removal_and_new_backends(name: str) -> None:
    pool = make_pool({"name": name, "key": "header:X-User"}, [1] * 8)

    def mapping() -> dict[int, str]:
        return {i: pool.algorithm.pick(pool._primary, keyed(i)).url for i in range(4000)}

    before = mapping()
    removed = pool.backends[3].url
    pool.remove_backend(removed)
    after = mapping()
    assert removed not in after.values()
    moved = sum(before[i] != after[i] for i in before)
    assert moved / len(before) < 1 / 8 + 0.06  # its own eighth, and little else
    pool.add_backend("http://10.1.0.99:80")
    assert "http://10.1.0.99:80" in mapping().values()
    # a fresh algorithm over the same backends agrees: nothing is left of the removed one
    fresh = make_pool({"name": name, "key": "header:X-User"}, [1] * 8)
    for url in [b.url for b in fresh.backends if b.url not in {b.url for b in pool.backends}]:
        fresh.remove_backend(url)
    fresh.add_backend("http://10.1.0.99:80")
    assert {i: fresh.algorithm.pick(fresh._primary, keyed(i)).url for i in range(4000)} == (
        mapping()
    )


def test_bounded_load_never_lets_a_backend_pass_its_cap() -> None:
    pool = make_pool(
        {"name": "consistent_hash", "key": "header:X-User", "bounded_load": 1.25}, [1] * 6
    )
    held = []
    for i in range(300):
        hot = keyed(i % 3)  # three hot keys
        backend = pool.acquire(hot)
        held.append(backend)
        cap = math.ceil(1.25 * len(held) / 6)
        assert backend.active_requests <= cap
    assert max(b.active_requests for b in pool.backends) <= math.ceil(1.25 * 300 / 6)
    for backend in held:
        pool.release(backend, ok=True, latency_ms=1.0)
