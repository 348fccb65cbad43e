"""The simulator against queueing theory, where theory has an answer.

Every number here is a formula's, never an earlier run's: a simulator that
queued, dispatched or timed requests wrongly fails these tests. The
simulations have fixed seeds, so the tests are deterministic; each
tolerance is about three standard deviations of the spread over seeds 1 to
16 (measured when the tests were written, and said at each one), so a
different seed passes too.

Backends here are single servers with exponential service (``slots = 1``,
``latency_ms = 10``: mu = 100 per second); arrivals are Poisson.
"""

from __future__ import annotations

import functools
import itertools
import math
import random
from collections.abc import Sequence

import pytest

from balancekit import Backend
from balancekit._plugins import make_plugin_manager
from balancekit._request import RequestInfo
from balancekit.simulate import BackendModel, Result, Scenario, simulate

ALGORITHMS = {
    name: cls
    for name, (cls, _) in make_plugin_manager(entry_points=False).classes("algorithm").items()
}
SERVICE_MS = 10.0
MU = 1000 / SERVICE_MS
C = 4
#: M/M/c as the simulator has it: one backend, c slots, one FIFO queue.
CENTRAL = Scenario("mmc", "one queue, c servers", (BackendModel("b", slots=C),))
#: c backends of one slot each: a request joins one backend's queue when picked.
SEPARATE = Scenario(
    "c-queues", "c single servers", tuple(BackendModel(f"b{i}", slots=1) for i in range(C))
)


def erlang_c(c: int, a: float) -> float:
    """The probability that an arrival waits in M/M/c, offered load ``a = lambda / mu``."""
    top = a**c / math.factorial(c) * c / (c - a)
    return top / (sum(a**k / math.factorial(k) for k in range(c)) + top)


def mmc_mean_ms(c: int, rho: float) -> float:
    """M/M/c mean response time: W = C(c, a) / (c mu - lambda) + 1 / mu."""
    lam = rho * c * MU
    return (erlang_c(c, lam / MU) / (c * MU - lam) + 1 / MU) * 1000


def mm1_mean_ms(rho: float) -> float:
    """M/M/1 mean response time, 1 / (mu - lambda): c servers each sent
    lambda / c by random dispatch (Poisson splitting)."""
    return 1000 / (MU - rho * MU)


#: Join-the-shortest-queue over 4 exponential single servers, W x mu: the
#: stationary distribution of its Markov chain (states: the sorted queue
#: lengths, each at most 16), solved by ``jsq_mean`` below, which
#: ``test_the_jsq_values_are_those_of_its_markov_chain`` reruns. There is
#: no closed form; JSQ is slower than M/M/c because a request waits behind
#: its own backend while another may have gone idle: by 6.5 % at rho = 0.5
#: and 11.9 % at 0.8 (JSQ_4 over M/M/c's W x mu, 1.0870 and 1.7455).
JSQ_4 = {0.5: 1.158151, 0.8: 1.953117}


@pytest.mark.parametrize(
    ("rho", "tolerance", "random_tolerance"),
    [
        # spread over 16 seeds: 0.6 % (central, least_connections), 1.3 % (random)
        pytest.param(0.5, 0.02, 0.04, id="rho-0.5"),
        # 1.9 % and 4.3 %: at 80 % a queue remembers longer
        pytest.param(0.8, 0.06, 0.13, id="rho-0.8"),
    ],
)
def test_mmc_least_connections_lies_between_mmc_and_mm1(
    rho: float, tolerance: float, random_tolerance: float
) -> None:
    mmc, mm1 = mmc_mean_ms(C, rho), mm1_mean_ms(rho)
    central = simulate(CENTRAL, ALGORITHMS["round_robin"], requests=100_000, load=rho, seed=1)
    assert central.mean_ms == pytest.approx(mmc, rel=tolerance), "one queue, c slots: Erlang C"
    scattered = simulate(SEPARATE, ALGORITHMS["random"], requests=100_000, load=rho, seed=1)
    assert scattered.mean_ms == pytest.approx(mm1, rel=random_tolerance), "random: c x M/M/1"
    shortest = simulate(
        SEPARATE, ALGORITHMS["least_connections"], requests=100_000, load=rho, seed=1
    )
    # least_connections over single servers is join-the-shortest-queue.
    assert shortest.mean_ms == pytest.approx(JSQ_4[rho] * SERVICE_MS, rel=tolerance)
    assert mmc < shortest.mean_ms < mm1


def jsq_mean(c: int, rho: float, longest: int) -> float:
    """JSQ's mean response time x mu over ``c`` exponential servers at load
    ``rho``, queues cut at ``longest``: Little's law over the stationary
    distribution of the uniformised chain, by power iteration."""
    np = pytest.importorskip("numpy")
    lam = rho * c
    states = list(itertools.combinations_with_replacement(range(longest + 1), c))
    index = {state: i for i, state in enumerate(states)}
    moves: list[tuple[int, int, float]] = []
    for i, state in enumerate(states):
        if state[0] < longest:  # an arrival joins a shortest queue
            moves.append((i, index[tuple(sorted((state[0] + 1, *state[1:])))], lam))
        for length in set(state) - {0}:  # a departure from a queue that long
            k = state.index(length)
            after = tuple(sorted((*state[:k], length - 1, *state[k + 1 :])))
            moves.append((i, index[after], float(state.count(length))))
    source, target, rate = (np.array(column) for column in zip(*moves, strict=True))
    size = len(states)
    out = np.bincount(source, weights=rate, minlength=size)
    step = out.max()
    stay, rate = 1 - out / step, rate / step
    pi = np.full(size, 1 / size)
    total = np.array([sum(state) for state in states], dtype=float)
    mean, before = float(pi @ total), math.inf
    while abs(mean - before) > 1e-12:
        for _ in range(100):
            pi = pi * stay + np.bincount(target, weights=pi[source] * rate, minlength=size)
        mean, before = float(pi @ total), mean
    return mean / lam


def test_the_jsq_values_are_those_of_its_markov_chain() -> None:
    assert jsq_mean(1, 0.8, 150) == pytest.approx(1 / (1 - 0.8), rel=1e-6), "M/M/1"
    for rho, value in JSQ_4.items():
        assert jsq_mean(C, rho, 16) == pytest.approx(value, rel=1e-5)


# --- the power of two choices ----------------------------------------------------

#: Mitzenmacher's supermarket model: n single servers, Poisson arrivals at
#: lambda x n, exponential service at 1. The fixed point holds as n grows;
#: at n = 100 the deeper tail is a little heavier (the paper's tables show
#: the same), hence tolerances that widen with i.
SUPERMARKET = Scenario(
    "supermarket", "100 single servers", tuple(BackendModel(f"s{i}", slots=1) for i in range(100))
)


class TwoChoices:
    """The supermarket model's rule: two backends at random, the one with
    fewer requests (ties to the first drawn, itself random)."""

    name = "two_choices"

    def __init__(self, *, rng: random.Random) -> None:
        self._rng = rng

    def pick(self, backends: Sequence[Backend], request: RequestInfo) -> Backend:
        count = len(backends)
        first = int(self._rng.random() * count)
        second = int(self._rng.random() * (count - 1))
        if second >= first:
            second += 1
        a, b = backends[first], backends[second]
        return b if b.active_requests < a.active_requests else a


@functools.cache
def supermarket(name: str, lam: float) -> Result:
    algorithm = TwoChoices if name == "two_choices" else ALGORITHMS[name]
    return simulate(SUPERMARKET, algorithm, requests=100_000, load=lam, seed=1)


def two_choices_tail(lam: float, i: int) -> float:
    """s_i = lambda^((d^i - 1) / (d - 1)) with d = 2: the share of queues
    holding at least i requests (Mitzenmacher, "The Power of Two Choices in
    Randomized Load Balancing", IEEE TPDS 12(10), 2001)."""
    return lam ** (2**i - 1)


@pytest.mark.parametrize(
    "lam", [pytest.param(0.8, id="load-0.8"), pytest.param(0.9, id="load-0.9")]
)
def test_two_choices_reach_mitzenmachers_fixed_point(lam: float) -> None:
    result = supermarket("two_choices", lam)
    tail = result.queue_tail
    # s_1 is the servers' utilisation, lambda itself (0.4 % spread over seeds).
    assert tail[1] == pytest.approx(lam, abs=0.015)
    # The formula at the load this run actually had, so that the spread of
    # the arrivals does not count twice (s_i moves as lambda^(2^i - 1)).
    had = tail[1]
    # n = 100, over 8 seeds at 0.8: s_2 +-1 %, s_3 0 to +5 %, s_4 +10 to +19 %.
    for i, tolerance in ((2, 0.03), (3, 0.10), (4, 0.30)):
        assert tail[i] == pytest.approx(two_choices_tail(had, i), rel=tolerance), f"s_{i}"
    # Little's law: W = sum(s_i) / lambda (in service times); spread 1.6 %.
    mean_ms = SERVICE_MS * sum(two_choices_tail(had, i) for i in range(1, 20)) / had
    assert result.mean_ms == pytest.approx(mean_ms, rel=0.05)


def test_random_queues_are_geometric() -> None:
    # One choice: each server is M/M/1 at lambda, s_i = lambda^i (spread
    # over seeds under 1 % of s_i up to i = 5).
    tail = supermarket("random", 0.8).queue_tail
    assert tail[1] == pytest.approx(0.8, abs=0.015)
    for i in range(2, 6):
        assert tail[i] == pytest.approx(tail[1] ** i, rel=0.03), f"s_{i}"


def test_p2c_lies_between_one_choice_and_two() -> None:
    # balancekit's p2c compares latency x (in flight + 1), not queue
    # lengths: on identical backends its latency averages are noise, so it
    # does worse than the supermarket's rule, and far better than random.
    lam = 0.8
    p2c, two, one = (supermarket(name, lam) for name in ("p2c", "two_choices", "random"))
    had = p2c.queue_tail[1]
    for i in range(2, 6):
        assert two_choices_tail(had, i) < p2c.queue_tail[i] < had**i, f"s_{i}"
    assert SERVICE_MS * sum(two_choices_tail(had, i) for i in range(1, 20)) / had < p2c.mean_ms
    assert p2c.mean_ms < SERVICE_MS / (1 - had)
    # The most requests any queue held: log log n / log 2 + O(1) for two
    # choices, log n / log(1 / lambda) order for one (5-6, 12-16 and 33-47
    # over 8 seeds for two_choices, p2c and random).
    assert two.max_queue < p2c.max_queue < one.max_queue
