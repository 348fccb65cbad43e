"""``balancekit simulate``: which algorithm for which workload, in numbers.

A discrete-event simulation with no sockets, threads or sleeping. Backends
are servers with a number of concurrent slots and a service-time
distribution, queueing what they cannot start (FIFO); requests arrive as a
Poisson stream at ``load`` times the fleet's capacity, or at a load that
changes in phases (``bursty``). Every pick goes through a real
:class:`~balancekit._pool.Pool` and the real algorithm object, on a clock
the simulation moves, so in-flight counts, latency averages, failures and
(when configured) outlier ejection feed the algorithm exactly as in the
proxy. The same seed gives the same numbers.

A request joins its backend's queue when it is picked, as in a proxy:
there is no central queue and no moving to another backend later. So
``least_connections`` over single-slot backends is join-the-shortest-queue,
a little slower than the M/M/c queue of queueing theory (which serves one
central queue); ``tests/test_simulate_theory.py`` checks the simulator
against both bounds and against Mitzenmacher's power of two choices.

Several balancers (``balancers = N``): N independent pools, each with its
own algorithm object, in front of the same backends, as N proxy processes
or hosts are. Each arrival goes to one of them drawn uniformly at random
(so each sees a Poisson stream of 1/N of the load, as when clients are
spread by DNS or a layer-4 balancer), and a balancer knows only its own
requests: its in-flight counts and latency averages, never the others'.
The backends' slots and queues are shared by all.

The pool settings of section 16 run through the real Pool as well:

- ``hedge = { after, max }``: when a request's first try has not ended
  ``after`` seconds after it began, up to ``max`` more tries start (one
  each ``after``) on other backends, picked by the same algorithm
  (``acquire`` with ``exclude``) and each holding a place in the pool's
  retry budget, as the engine's ``Attempts.hedge_next`` does. The
  simulator has no response head apart from the end of a request, so
  "first head" is "first to end" here. The first success wins; the
  losers are cancelled at that moment: a loser still queued leaves its
  backend's queue, one in service frees its slot, and both are released
  without blame, their time so far fed to the latency average as a lower
  bound (``Pool.release(at_least=)``).
  A try that fails leaves the race to the others; the last one failing
  fails the request. The hedges draw their service times from a stream
  of their own, so a run with hedging and one without see the same
  arrivals and first tries.
- ``adaptive_concurrency``: the Pool's own limit, on the simulated clock.
  A request over it finds the pool full: it waits in section 11's queue
  (``max_pending``, ``queue_timeout``) when the scenario has one, else it
  is a 503 at once; both count in ``error_rate`` and in ``rejected``.
- ``prequal`` (any algorithm with ``send_probe`` and ``record_probe``):
  its probes, sent at its own ``probe_rate`` from its pick, are answered
  at once with what the backend's ``LoadReportMiddleware`` would say at
  that moment: the requests it holds (queued or served, from every
  balancer) and an EWMA (alpha 0.1) of their time there, fed when one
  ends (a cancelled hedge's loser feeds none). Each balancer has its own
  probes, so unlike least_connections' counts they see the whole load; a
  real probe's round trip is not modelled. Its reuse and age rules are
  the algorithm's own, on the simulated clock.
"""

from __future__ import annotations

import bisect
import functools
import heapq
import math
import random
import tomllib
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, field_validator

from ._backend import Backend, percentile
from ._config import (
    AdaptiveConcurrencyConfig,
    Duration,
    HedgeConfig,
    NonNegativeInt,
    OutlierDetectionConfig,
    PoolConfig,
    PositiveInt,
    Schema,
    nest,
    validate,
)
from ._exceptions import ConfigError, NoEligibleBackend, Problem
from ._plugins import build_plugin
from ._pool import Pool, Waiter
from ._request import RequestInfo
from .load_report import DEFAULT_ALPHA

#: Distinct client addresses requests come from (the hash algorithms' key).
CLIENTS = 1000
DISTRIBUTIONS = ("exponential", "lognormal", "constant")


@dataclass(frozen=True)
class BackendModel:
    """One simulated backend: ``slots`` requests served at once, each taking
    ``latency_ms`` on average (drawn from ``distribution``); a share
    ``failure_rate`` of requests fail after ``failure_latency_ms``.

    A gray failure: for the last ``slow_share`` of every ``slow_period_s``
    seconds, the requests that start are served ``slow_factor`` times
    slower, and still succeed."""

    name: str
    slots: int = 4
    latency_ms: float = 10.0
    distribution: str = "exponential"
    sigma: float = 0.5  # lognormal only: the spread of the log
    failure_rate: float = 0.0
    failure_latency_ms: float = 1.0
    weight: int = 1
    slow_factor: float = 1.0
    slow_share: float = 0.0
    slow_period_s: float = 2.0

    @property
    def url(self) -> str:
        return f"http://{self.name}"

    @property
    def capacity(self) -> float:
        """Requests per second it can serve at most (on average over its
        slow and healthy spells)."""
        mean_s = (
            (1 - self.failure_rate) * self.latency_ms + self.failure_rate * self.failure_latency_ms
        ) / 1000
        healthy = self.slots / mean_s
        return (1 - self.slow_share) * healthy + self.slow_share * healthy / self.slow_factor

    def slow_at(self, now: float) -> bool:
        """Whether a request starting at ``now`` meets the gray failure."""
        period = self.slow_period_s
        return self.slow_share > 0 and now % period >= period * (1 - self.slow_share)


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    backends: tuple[BackendModel, ...]
    #: The offered load, a share of the fleet's capacity (with ``phases``:
    #: their time-weighted mean).
    load: float = 0.7
    #: ``None``: requests come from ``CLIENTS`` addresses; a number: each
    #: carries ``X-User``, drawn from that many keys by Zipf's law (s = 1.1).
    hot_keys: int | None = None
    #: Options per algorithm name (a scenario file's ``[algorithms.NAME]``).
    algorithm_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    outlier_detection: Mapping[str, Any] | None = None
    #: Independent balancers sharing the backends (see the module docstring).
    balancers: int = 1
    #: ``(seconds, load)`` phases repeated in turn; empty: ``load`` throughout.
    #: A ``load`` other than their mean scales every phase alike.
    phases: tuple[tuple[float, float], ...] = ()
    #: The pool settings of section 16 and the queue of section 11, as a
    #: balancer's ``[pools.NAME]`` has them (``{"after": 0.05, "max": 1}``,
    #: ``{"min_limit": 4, ...}``); None: off.
    hedge: Mapping[str, Any] | None = None
    adaptive_concurrency: Mapping[str, Any] | None = None
    max_pending: int = 0
    queue_timeout: float = 1.0


def _five(**odd: Any) -> tuple[BackendModel, ...]:
    return tuple(BackendModel(f"b{i}", **(odd if i == 5 else {})) for i in range(1, 6))


SCENARIOS: dict[str, Scenario] = {
    "uniform": Scenario("uniform", "five identical backends", _five()),
    "slow-backend": Scenario(
        "slow-backend", "five backends, one of them 10x slower", _five(latency_ms=100.0)
    ),
    "flaky-backend": Scenario(
        "flaky-backend", "five backends, one fails 30% of requests, fast", _five(failure_rate=0.3)
    ),
    "heterogeneous": Scenario(
        "heterogeneous",
        "capacities 1 to 5 (slots), with matching weights",
        tuple(BackendModel(f"b{i}", slots=i, weight=i) for i in range(1, 6)),
    ),
    "hot-keys": Scenario(
        "hot-keys",
        "five identical backends; requests keyed by X-User, Zipf-distributed over 10,000 users",
        _five(),
        hot_keys=10_000,
        algorithm_options={
            "consistent_hash": {"key": "header:X-User"},
            "maglev": {"key": "header:X-User"},
        },
    ),
    # A second at 110 % leaves a backlog of about 40 requests per backend
    # (100 ms of waiting at its end); the next second, at 30 %, drains it in
    # about 0.15 s. 100,000 requests see 36 bursts.
    "bursty": Scenario(
        "bursty",
        "five identical backends; offered load 30% and 110% of capacity in turn, 1 s each",
        _five(),
        phases=((1.0, 0.3), (1.0, 1.1)),
    ),
    "gray-failure": Scenario(
        "gray-failure",
        "five backends; one answers 20x slower (still 200 OK) for 1 s in every 2 s",
        _five(slow_factor=20.0, slow_share=0.5, slow_period_s=2.0),
    ),
}


@dataclass
class Result:
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    error_rate: float
    share: dict[str, float]
    max_share_ratio: float
    #: ``queue_tail[i]``: the time-averaged share of backends with at least
    #: ``i`` requests (in service or queued), until the last arrival.
    queue_tail: tuple[float, ...] = ()
    #: The most requests any backend held at once.
    max_queue: int = 0
    #: With ``hedge``: hedged tries per request (the extra load), and the
    #: share of hedged tries that answered first.
    hedge_share: float | None = None
    hedge_wins: float | None = None
    #: Requests refused or timed out before any backend (503s), a share of
    #: all requests; counted in ``error_rate`` too.
    rejected: float = 0.0
    #: With ``adaptive_concurrency``: balancer 0's limit, ``(time, limit)``
    #: at each arrival that found it changed.
    limits: tuple[tuple[float, int], ...] | None = None

    def as_dict(self) -> dict[str, Any]:
        result: dict[str, Any] = {
            "p50_ms": round(self.p50_ms, 3),
            "p95_ms": round(self.p95_ms, 3),
            "p99_ms": round(self.p99_ms, 3),
            "mean_ms": round(self.mean_ms, 3),
            "error_rate": round(self.error_rate, 6),
            "share": {name: round(value, 6) for name, value in self.share.items()},
            "max_share_ratio": round(self.max_share_ratio, 4),
        }
        if self.hedge_share is not None and self.hedge_wins is not None:
            result["hedge_share"] = round(self.hedge_share, 6)
            result["hedge_wins"] = round(self.hedge_wins, 6)
        if self.limits is not None:
            values = [limit for _, limit in self.limits]
            result["rejected"] = round(self.rejected, 6)
            result["concurrency_limit"] = {
                "min": min(values),
                "max": max(values),
                "last": values[-1],
                "changes": len(values) - 1,
            }
        elif self.rejected:
            result["rejected"] = round(self.rejected, 6)
        return result


def _sampler(model: BackendModel, rng: random.Random) -> Callable[[], float]:
    """Service times in seconds."""
    mean = model.latency_ms / 1000
    if model.distribution == "constant":
        return lambda: mean
    if model.distribution == "lognormal":
        # the mean of a lognormal is exp(mu + sigma^2 / 2)
        mu = math.log(mean) - model.sigma**2 / 2
        sigma = model.sigma
        return lambda: rng.lognormvariate(mu, sigma)
    return lambda: rng.expovariate(1 / mean)


def _zipf_cdf(keys: int, s: float = 1.1) -> list[float]:
    weights = [1 / (k**s) for k in range(1, keys + 1)]
    total = sum(weights)
    running = 0.0
    cdf = []
    for w in weights:
        running += w
        cdf.append(running / total)
    return cdf


def _request_maker(scenario: Scenario, rng: random.Random) -> Callable[[], RequestInfo]:
    clients = [f"10.{i // 250}.{i % 250}.1" for i in range(CLIENTS)]
    cdf = _zipf_cdf(scenario.hot_keys) if scenario.hot_keys else None

    def make() -> RequestInfo:
        headers = []
        if cdf is not None:
            user = bisect.bisect_left(cdf, rng.random())
            headers = [(b"x-user", str(user).encode())]
        return RequestInfo(
            "GET", "/", headers=headers, client_ip=clients[int(rng.random() * CLIENTS)]
        )

    return make


class _Arrivals:
    """Arrival times: Poisson at ``rate``, or at ``rate`` times each phase's
    share in turn. Poisson gaps have no memory, so a gap that would cross
    the end of a phase is drawn again from there, at the next phase's rate."""

    def __init__(
        self, rate: float, phases: Sequence[tuple[float, float]], rng: random.Random
    ) -> None:
        self._expovariate = rng.expovariate
        self._phases = [(seconds, rate * share) for seconds, share in phases]
        if not self._phases:
            self._phases = [(math.inf, rate)]
        self._index = 0
        self._end = self._phases[0][0]

    def after(self, now: float) -> float:
        while True:
            at = now + self._expovariate(self._phases[self._index][1])
            if at < self._end:
                return at
            # The phase is followed by index, not by now % cycle, which
            # rounding could leave at the end of the phase it is leaving.
            now = self._end
            self._index = (self._index + 1) % len(self._phases)
            self._end += self._phases[self._index][0]


def _base_rate(scenario: Scenario, load: float | None) -> float:
    """Arrivals per second at a load share of 1 in the scenario's phases."""
    capacity = sum(m.capacity for m in scenario.backends)
    wanted = scenario.load if load is None else load
    if not scenario.phases:
        return wanted * capacity
    return wanted / _mean_load(scenario.phases) * capacity


def _mean_load(phases: Sequence[tuple[float, float]]) -> float:
    return sum(seconds * share for seconds, share in phases) / sum(s for s, _ in phases)


class _QueueLengths:
    """How long each backend held each number of requests, until ``stop``."""

    def __init__(self, backends: int) -> None:
        self._count = [0] * backends
        self._since = [0.0] * backends
        self._time = [[0.0] for _ in range(backends)]
        self.most = 0
        self._on = True

    def change(self, j: int, now: float, delta: int) -> None:
        if not self._on:
            return
        count = self._count[j]
        times = self._time[j]
        times[count] += now - self._since[j]
        self._since[j] = now
        count += delta
        self._count[j] = count
        if count == len(times):
            times.append(0.0)
            self.most = max(self.most, count)

    def stop(self, now: float) -> None:
        for j in range(len(self._count)):
            self.change(j, now, 0)
        self._on = False

    def tail(self) -> tuple[float, ...]:
        merged = [0.0] * max(len(times) for times in self._time)
        for times in self._time:
            for k, seconds in enumerate(times):
                merged[k] += seconds
        total = sum(merged)
        if not total:
            return ()
        at_least = []
        running = total
        for seconds in merged:
            at_least.append(running / total)
            running -= seconds
        return tuple(at_least)


def construct(
    cls: type[Any], options: Mapping[str, Any], clock: Callable[[], float], seed: int
) -> Any:
    """An algorithm built as the Balancer builds it, its seams filled in:
    the simulation's clock, and a seeded ``rng`` for the random ones."""
    path = f"algorithms.{cls.name}"
    return build_plugin(cls, options, path, clock=clock, rng=random.Random(seed))


def _pool(scenario: Scenario, algorithm: Any, clock: Callable[[], float]) -> Pool:
    config = PoolConfig.model_validate(
        {
            "backends": [{"url": b.url, "weight": b.weight} for b in scenario.backends],
            "max_connections": 10**9,  # the models queue; nothing is refused
            "outlier_detection": scenario.outlier_detection,
            "hedge": scenario.hedge,
            "adaptive_concurrency": scenario.adaptive_concurrency,
            "max_pending": scenario.max_pending,
            "queue_timeout": scenario.queue_timeout,
        }
    )
    return Pool("simulated", config, algorithm, clock=clock)


class _Request:
    """One client request: its tries (the first, then any hedges)."""

    __slots__ = ("arrived", "done", "hedges", "info", "pool", "tries", "waiter")

    def __init__(self, info: RequestInfo, pool: Pool, arrived: float) -> None:
        self.info = info
        self.pool = pool
        self.arrived = arrived
        self.tries: list[_Try] = []
        self.hedges = 0
        self.done = False
        #: Its place in the pool's queue (``max_pending``) while it waits there.
        self.waiter: Waiter | None = None


class _Try:
    """One try of a request on one backend: queued there, then served."""

    __slots__ = ("backend", "began", "fails", "hedge", "j", "over", "request", "service", "serving")

    def __init__(
        self, request: _Request, backend: Backend, j: int, began: float, hedge: bool
    ) -> None:
        self.request = request
        self.backend = backend
        self.j = j
        self.began = began
        self.hedge = hedge
        self.service = 0.0
        self.fails = False
        self.serving = False
        #: Ended or cancelled: its end event, or its place in a queue, is void.
        self.over = False


_ARRIVE, _END, _HEDGE, _GIVE_UP = range(4)
#: The backends' latency average (``load_report.DEFAULT_ALPHA``).
REPORT_ALPHA = DEFAULT_ALPHA


def _answer_probes(algorithm: Any, run: _Run) -> bool:
    # An algorithm that probes backends (prequal) has its one probing
    # method replaced: the answer is the backend's state at that moment.
    if not (
        callable(getattr(algorithm, "send_probe", None))
        and callable(getattr(algorithm, "record_probe", None))
    ):
        return False
    algorithm.send_probe = functools.partial(run.probe, algorithm)
    return True


class _Run:
    """One simulation: the event loop and the state it moves.

    Events are ``(time, sequence, kind, subject)``; a cancelled try's end
    event stays in the heap and is skipped when it comes (``over``), as its
    place in a backend's queue is skipped when the queue reaches it.
    """

    def __init__(
        self,
        scenario: Scenario,
        algorithm: type[Any],
        requests: int,
        load: float | None,
        seed: int,
        count: int,
    ) -> None:
        self.now = 0.0
        self.requests = requests
        rng = self.rng = random.Random(seed)
        # The split has its own stream, so that the arrivals and service times
        # are the same whatever the number of balancers: a comparison of 1 and
        # N balancers differs by the balancing only (common random numbers).
        self.split = random.Random(f"{seed}/balancers").random
        # Hedged tries too: the first tries draw the same service times with
        # hedging and without.
        self.hedge_rng = random.Random(f"{seed}/hedges")
        options = scenario.algorithm_options.get(algorithm.name, {})
        clock = self.clock
        # Balancer 0 seeds its algorithm as a lone balancer always did.
        self.pools = [
            _pool(scenario, construct(algorithm, options, clock, seed + 1 + k), clock)
            for k in range(count)
        ]
        self.models = models = scenario.backends
        self.server = {b: j for pool in self.pools for j, b in enumerate(pool.backends)}
        #: What a backend's LoadReportMiddleware would report: the requests
        #: it holds (queued or served, from every balancer) and an EWMA of
        #: their time there.
        self.held = [0] * len(models)
        self.report_ms = [0.0] * len(models)
        self.reported = [False] * len(models)
        #: Whether an algorithm probes (prequal): the reports are kept then.
        self.probed = False
        for pool in self.pools:
            self.probed |= _answer_probes(pool.algorithm, self)
        self.samplers = [_sampler(model, rng) for model in models]
        self.hedge_samplers = [_sampler(model, self.hedge_rng) for model in models]
        self.gray = [model.slow_share > 0 for model in models]
        self.free = [model.slots for model in models]
        self.waiting: list[deque[_Try]] = [deque() for _ in models]
        self.queues = _QueueLengths(len(models))
        self.arrivals = _Arrivals(_base_rate(scenario, load), scenario.phases, rng)
        self.make_request = _request_maker(scenario, rng)
        self.served = [0] * len(models)
        self.latencies: list[float] = []
        self.errors = self.rejected = self.hedged = self.wins = 0
        self.events: list[tuple[float, int, int, Any]] = []
        self.sequence = 0
        self.arrived = 0
        #: Requests the pool's queue handed a backend, to start now.
        self.ready: list[_Request] = []
        #: Balancer 0's adaptive concurrency limit each time it changed.
        self.limits: list[tuple[float, int]] = []
        self.adaptive = self.pools[0].adaptive
        #: The pools' ``hedge`` terms (one configuration for all).
        self.terms = self.pools[0].config.hedge

    def clock(self) -> float:
        return self.now

    def push(self, at: float, kind: int, subject: Any) -> None:
        heapq.heappush(self.events, (at, self.sequence, kind, subject))
        self.sequence += 1

    def go(self) -> Result:
        self.push(self.arrivals.after(0.0), _ARRIVE, None)
        events = self.events
        while events:
            self.now, _, kind, subject = heapq.heappop(events)
            if kind == _END:
                self.end(subject)
            elif kind == _ARRIVE:
                self.arrive()
            elif kind == _HEDGE:
                self.hedge(subject)
            else:
                self.give_up(subject)
        return _result(self)

    # --- a request comes, waits, begins -------------------------------------------

    def arrive(self) -> None:
        now = self.now
        self.arrived += 1
        if self.arrived < self.requests:
            self.push(self.arrivals.after(now), _ARRIVE, None)
        else:
            self.queues.stop(now)
        info = self.make_request()
        count = len(self.pools)
        pool = self.pools[int(self.split() * count)] if count > 1 else self.pools[0]
        adaptive = self.adaptive
        if adaptive is not None and (not self.limits or self.limits[-1][1] != adaptive.limit):
            self.limits.append((now, adaptive.limit))
        request = _Request(info, pool, now)
        backend: Backend | None
        try:
            backend = pool.acquire(info)
        except NoEligibleBackend as exc:
            if not (exc.full and pool.max_pending):  # a 503 at once
                self.errors += 1
                self.rejected += 1
                return
            backend = self.enqueue(request)
        if backend is not None:  # else waiting in the queue, or refused
            self.begin(request, backend, hedge=False)

    def enqueue(self, request: _Request) -> Backend | None:
        """Section 11's queue: a backend at once, or None (waiting, or refused)."""
        pool = request.pool
        try:
            waiter = pool.enqueue(request.info, (), lambda: self.ready.append(request))
        except NoEligibleBackend:
            self.errors += 1
            self.rejected += 1
            return None
        if waiter.backend is None:
            request.waiter = waiter
            self.push(self.now + pool.queue_timeout, _GIVE_UP, request)
        return waiter.backend

    def give_up(self, request: _Request) -> None:
        waiter = request.waiter
        if waiter is None:
            return  # served from the queue in time
        request.waiter = None
        request.pool.leave(waiter, keep=False)
        request.done = True
        self.errors += 1
        self.rejected += 1

    def begin(self, request: _Request, backend: Backend, *, hedge: bool) -> None:
        j = self.server[backend]
        self.served[j] += 1
        self.held[j] += 1
        self.queues.change(j, self.now, 1)
        model = self.models[j]
        attempt = _Try(request, backend, j, self.now, hedge)
        rng = self.hedge_rng if hedge else self.rng
        attempt.fails = model.failure_rate > 0 and rng.random() < model.failure_rate
        if attempt.fails:
            attempt.service = model.failure_latency_ms / 1000
        else:
            attempt.service = (self.hedge_samplers if hedge else self.samplers)[j]()
        request.tries.append(attempt)
        if self.free[j]:
            self.free[j] -= 1
            self.serve(attempt)
        else:
            self.waiting[j].append(attempt)
        terms = self.terms
        if terms is not None and not hedge:
            heapq.heappush(self.events, (self.now + terms.after, self.sequence, _HEDGE, request))
            self.sequence += 1

    def serve(self, attempt: _Try) -> None:
        j = attempt.j
        if self.gray[j] and self.models[j].slow_at(self.now):
            attempt.service *= self.models[j].slow_factor
        attempt.serving = True
        heapq.heappush(self.events, (self.now + attempt.service, self.sequence, _END, attempt))
        self.sequence += 1

    # --- hedging: as Attempts.hedge_next / hedge_won / hedge_end --------------------

    def hedge(self, request: _Request) -> None:
        """``after`` seconds since the last try began and no try has ended:
        one more on another backend, holding a place in the retry budget."""
        if request.done:
            return
        pool = request.pool
        if not pool.try_acquire_retry():
            return  # the budget is spent: wait for those racing
        tried = [t.backend for t in request.tries]
        try:
            backend = pool.acquire(request.info, exclude=tried)
        except NoEligibleBackend:
            pool.release_retry(began=False)
            return
        pool.retry_began()
        if backend in tried:  # the only eligible one is racing already
            self.release(pool, backend, ok=True, latency_ms=None)
            pool.release_retry()
            return
        request.hedges += 1
        self.hedged += 1
        self.begin(request, backend, hedge=True)
        terms = self.terms
        assert terms is not None
        if request.hedges < terms.max:
            self.push(self.now + terms.after, _HEDGE, request)

    # --- a try ends, or is cancelled ------------------------------------------------

    def end(self, attempt: _Try) -> None:
        if attempt.over:
            return  # cancelled: its slot was freed then
        attempt.over = True
        now = self.now
        j = attempt.j
        self.queues.change(j, now, -1)
        request = attempt.request
        elapsed_ms = (now - attempt.began) * 1000
        self.held[j] -= 1
        if self.probed:
            self.report(j, elapsed_ms, failed=attempt.fails)
        if attempt.fails:
            self.settle(attempt, ok=False, latency_ms=elapsed_ms)
            if not any(not t.over for t in request.tries):  # the last one standing
                request.done = True
                self.errors += 1
        else:
            request.done = True
            self.settle(attempt, ok=True, latency_ms=elapsed_ms)
            self.latencies.append((now - request.arrived) * 1000)
            if attempt.hedge:
                self.wins += 1
            for other in request.tries:
                if not other.over:
                    self.cancel(other)
        self.free_slot(j)

    def cancel(self, attempt: _Try) -> None:
        """A loser of the race leaves its backend's queue, or stops being
        served: its slot is free at once. No blame; its time so far is a
        lower bound of the backend's (``Pool.release(at_least=)``)."""
        attempt.over = True
        self.held[attempt.j] -= 1  # the backend stops it: no load report
        self.queues.change(attempt.j, self.now, -1)
        elapsed_ms = (self.now - attempt.began) * 1000
        self.settle(attempt, ok=True, latency_ms=elapsed_ms, at_least=True)
        if attempt.serving:
            self.free_slot(attempt.j)

    def report(self, j: int, elapsed_ms: float, *, failed: bool) -> None:
        # LoadTracker.end: a failure feeds the average only when it raises it.
        old = self.report_ms[j]
        if not self.reported[j]:
            self.report_ms[j], self.reported[j] = elapsed_ms, True
        elif not failed or elapsed_ms > old:
            self.report_ms[j] = old + REPORT_ALPHA * (elapsed_ms - old)

    def probe(self, algorithm: Any, backend: Backend) -> None:
        """A probe of ``backend``, answered at once with its true state."""
        j = self.server[backend]
        algorithm.record_probe(backend, self.held[j], self.report_ms[j], at=self.now)

    def settle(
        self, attempt: _Try, *, ok: bool, latency_ms: float | None, at_least: bool = False
    ) -> None:
        pool = attempt.request.pool
        self.release(pool, attempt.backend, ok=ok, latency_ms=latency_ms, at_least=at_least)
        if attempt.hedge:
            pool.release_retry()

    def release(
        self,
        pool: Pool,
        backend: Backend,
        *,
        ok: bool,
        latency_ms: float | None,
        at_least: bool = False,
    ) -> None:
        pool.release(backend, ok=ok, latency_ms=latency_ms, at_least=at_least)
        while self.ready:  # the pool's queue handed out the place
            request = self.ready.pop(0)
            waiter, request.waiter = request.waiter, None
            assert waiter is not None and waiter.backend is not None
            self.begin(request, waiter.backend, hedge=False)

    def free_slot(self, j: int) -> None:
        waiting = self.waiting[j]
        while waiting:
            attempt = waiting.popleft()
            if not attempt.over:
                self.serve(attempt)
                return
        self.free[j] += 1


def simulate(
    scenario: Scenario,
    algorithm: type[Any],
    *,
    requests: int = 100_000,
    load: float | None = None,
    seed: int = 1,
    balancers: int | None = None,
) -> Result:
    """Run ``requests`` requests of ``scenario`` through ``algorithm``, on
    ``balancers`` independent balancers (default: the scenario's)."""
    count = scenario.balancers if balancers is None else balancers
    if count < 1:
        raise ValueError(f"balancers: must be a positive integer, got {count!r}")
    return _Run(scenario, algorithm, requests, load, seed, count).go()


def _result(run: _Run) -> Result:
    latencies = run.latencies
    latencies.sort()
    total = sum(run.served) or 1
    share = {m.name: count / total for m, count in zip(run.models, run.served, strict=True)}
    mean_share = 1 / len(share)
    hedging = run.terms is not None
    return Result(
        p50_ms=percentile(latencies, 0.50) or 0.0,
        p95_ms=percentile(latencies, 0.95) or 0.0,
        p99_ms=percentile(latencies, 0.99) or 0.0,
        mean_ms=sum(latencies) / len(latencies) if latencies else 0.0,
        error_rate=run.errors / run.requests,
        share=share,
        max_share_ratio=max(share.values()) / mean_share,
        queue_tail=run.queues.tail(),
        max_queue=run.queues.most,
        hedge_share=run.hedged / run.requests if hedging else None,
        hedge_wins=run.wins / (run.hedged or 1) if hedging else None,
        rejected=run.rejected / run.requests,
        limits=tuple(run.limits) if run.adaptive is not None else None,
    )


def run(
    scenario: Scenario,
    algorithms: Mapping[str, type[Any]],
    *,
    requests: int = 100_000,
    load: float | None = None,
    seed: int = 1,
    balancers: int | None = None,
    hedge: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Every algorithm on ``scenario``: the ``--json`` document of the
    command, with ``"balancers"`` when there are several.

    ``hedge`` (``{"after": 0.05, "max": 1}``): each algorithm twice, side
    by side, as ``NAME`` (the scenario's pool settings) and ``NAME+hedge``
    (the same with these hedge terms), on the same arrivals and service
    times."""
    count = scenario.balancers if balancers is None else balancers
    variants = [("", scenario)]
    if hedge is not None:
        variants.append(("+hedge", replace(scenario, hedge=hedge)))
    results = {
        name + suffix: simulate(
            model, cls, requests=requests, load=load, seed=seed, balancers=count
        ).as_dict()
        for name, cls in algorithms.items()
        for suffix, model in variants
    }
    report: dict[str, Any] = {"scenario": scenario.name, "seed": seed, "requests": requests}
    if count != 1:
        report["balancers"] = count
    if hedge is not None:
        report["hedge"] = dict(HedgeConfig.model_validate(hedge).model_dump())
    report["algorithms"] = results
    return report


def recommend(report: Mapping[str, Any]) -> str:
    """One line: the lowest p99 among the algorithms whose error rate is
    within one percentage point of the best one's."""
    results = report["algorithms"]
    least = min(r["error_rate"] for r in results.values())
    fair = {n: r for n, r in results.items() if r["error_rate"] <= least + 0.01}
    best = min(fair, key=lambda n: (fair[n]["p99_ms"], fair[n]["mean_ms"]))
    r = fair[best]
    return (
        f"recommendation for {report['scenario']}: {best} "
        f"(p99 {r['p99_ms']:.1f} ms, {r['error_rate']:.2%} errors)"
    )


# --- scenario files --------------------------------------------------------------


def _positive(value: float) -> float:
    if not value > 0:
        raise ValueError(f"must be positive, got {value!r}")
    return value


def _distribution(value: str) -> str:
    if value not in DISTRIBUTIONS:
        raise ValueError(f"must be one of {', '.join(DISTRIBUTIONS)}, got {value!r}")
    return value


def _failure_rate(value: float) -> float:
    if not 0 <= value < 1:
        raise ValueError(f"must be in [0, 1), got {value!r}")
    return value


def _load(value: float) -> float:
    if not 0 < value < 1:
        raise ValueError(f"must be a share of capacity in (0, 1), got {value!r}")
    return value


def _share(value: float) -> float:
    if not 0 <= value <= 1:
        raise ValueError(f"must be in [0, 1], got {value!r}")
    return value


def _factor(value: float) -> float:
    if not value >= 1:
        raise ValueError(f"must be 1 or more, got {value!r}")
    return value


Positive = Annotated[float, AfterValidator(_positive)]


class BackendTable(Schema):
    """A scenario file's ``[[backends]]`` table (see :class:`BackendModel`)."""

    name: str | None = None
    slots: PositiveInt = 4
    latency_ms: Positive = 10.0
    distribution: Annotated[str, AfterValidator(_distribution)] = "exponential"
    sigma: Positive = 0.5
    failure_rate: Annotated[float, AfterValidator(_failure_rate)] = 0.0
    failure_latency_ms: Positive = 1.0
    weight: PositiveInt = 1
    slow_factor: Annotated[float, AfterValidator(_factor)] = 1.0
    slow_share: Annotated[float, AfterValidator(_share)] = 0.0
    slow_period_s: Positive = 2.0


class PhaseTable(Schema):
    """A scenario file's ``[[phases]]`` table: ``load`` (a share of
    capacity, above 1 for an overload) for ``seconds``."""

    seconds: Positive
    load: Positive


class ScenarioFile(Schema):
    """A scenario file, as :func:`load_scenario` documents it."""

    name: str | None = None
    description: str | None = None
    load: Annotated[float, AfterValidator(_load)] | None = None
    hot_keys: PositiveInt | None = None
    balancers: PositiveInt = 1
    phases: list[PhaseTable] = []
    backends: list[BackendTable]
    algorithms: dict[str, dict[str, Any]] = {}
    outlier_detection: OutlierDetectionConfig | None = None
    hedge: HedgeConfig | None = None
    adaptive_concurrency: AdaptiveConcurrencyConfig | None = None
    max_pending: NonNegativeInt = 0
    queue_timeout: Duration = 1.0

    @field_validator("phases")
    @classmethod
    def _stable_on_average(cls, phases: list[PhaseTable]) -> list[PhaseTable]:
        if phases:
            mean = _mean_load([(p.seconds, p.load) for p in phases])
            if not 0 < mean < 1:
                raise ValueError(
                    f"the time-weighted mean load must be in (0, 1), got {round(mean, 6)!r}"
                )
        return phases

    @field_validator("backends")
    @classmethod
    def _some_with_unique_names(
        cls, backends: tuple[BackendTable, ...]
    ) -> tuple[BackendTable, ...]:
        if not backends:
            raise ValueError("must list at least one [[backends]] table")
        names = [b.name or f"b{i + 1}" for i, b in enumerate(backends)]
        if len(set(names)) != len(names):
            raise ValueError("names must be unique")
        return backends


nest(
    ScenarioFile,
    backends=("list", BackendTable),
    phases=("list", PhaseTable),
    outlier_detection=("one", OutlierDetectionConfig),
    hedge=("one", HedgeConfig),
    adaptive_concurrency=("one", AdaptiveConcurrencyConfig),
)


def load_scenario(path: str | Path) -> Scenario:
    """A custom scenario from TOML; ConfigError naming the key path if wrong::

    name = "my-fleet"
    load = 0.8                   # or [[phases]] tables, below; not both
    hot_keys = 5000              # optional: Zipf-distributed X-User keys
    balancers = 4                # independent balancers sharing the backends
    [[backends]]
    name = "big"
    slots = 8
    latency_ms = 20
    distribution = "lognormal"   # exponential (default), lognormal, constant
    weight = 2
    [[backends]]
    name = "small"
    failure_rate = 0.05
    slow_factor = 20             # a gray failure: 20x slower (still a success)
    slow_share = 0.5             # for the last half
    slow_period_s = 2            # of every 2 s
    [[phases]]                   # the offered load in turn, the mean below 1
    seconds = 1
    load = 0.3
    [[phases]]
    seconds = 1
    load = 1.1
    [algorithms.consistent_hash]
    key = "header:X-User"
    [outlier_detection]
    consecutive_failures = 5
    [hedge]                      # the pool settings of section 16, as in [pools.NAME]
    after = 0.05
    max = 1
    [adaptive_concurrency]
    min_limit = 4
    max_limit = 1000
    window = 1
    # max_pending = 200          # section 11's queue, for requests over the limit
    # queue_timeout = 2
    """
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such scenario file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    try:
        scenario = validate(ScenarioFile, data)
    except ConfigError as exc:
        raise ConfigError(
            [Problem(f"{path.name}: {p.path}", p.message) for p in exc.problems]
        ) from None
    phases = tuple((p.seconds, p.load) for p in scenario.phases)
    if phases and scenario.load is not None:
        raise ConfigError(
            [Problem(f"{path.name}: load", "excludes [[phases]], whose mean is the load")]
        )
    backends = tuple(
        BackendModel(**{**table.model_dump(), "name": table.name or f"b{i + 1}"})
        for i, table in enumerate(scenario.backends)
    )
    outlier = scenario.outlier_detection
    hedge, adaptive = scenario.hedge, scenario.adaptive_concurrency
    return Scenario(
        name=scenario.name or path.stem,
        description=scenario.description or f"from {path.name}",
        backends=backends,
        load=_mean_load(phases) if phases else scenario.load or 0.7,
        hot_keys=scenario.hot_keys,
        algorithm_options=scenario.algorithms,
        outlier_detection=None if outlier is None else outlier.model_dump(),
        balancers=scenario.balancers,
        phases=phases,
        hedge=None if hedge is None else hedge.model_dump(),
        adaptive_concurrency=None if adaptive is None else adaptive.model_dump(),
        max_pending=scenario.max_pending,
        queue_timeout=scenario.queue_timeout,
    )


def buildable(
    scenario: Scenario, algorithms: Mapping[str, type[Any]]
) -> tuple[dict[str, type[Any]], dict[str, str]]:
    """The algorithms that can run on ``scenario``, and why the others cannot
    (a plugin that needs options the scenario does not give)."""
    ok: dict[str, type[Any]] = {}
    skipped: dict[str, str] = {}
    for name, cls in algorithms.items():
        try:
            construct(cls, scenario.algorithm_options.get(name, {}), lambda: 0.0, 0)
        except ConfigError as exc:
            skipped[name] = str(exc)
        else:
            ok[name] = cls
    return ok, skipped


def plot(report: Mapping[str, Any], path: str | Path) -> None:
    """Latency percentiles per algorithm and load share per backend, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["algorithms"]
    names = sorted(results, key=lambda n: results[n]["p99_ms"])
    backends = list(next(iter(results.values()))["share"]) if results else []
    figure, (left, right) = plt.subplots(1, 2, figsize=(14, 5.5), dpi=100)
    width = 0.27
    for i, (label, key) in enumerate((("p50", "p50_ms"), ("p95", "p95_ms"), ("p99", "p99_ms"))):
        left.bar(
            [x + (i - 1) * width for x in range(len(names))],
            [max(results[n][key], 0.01) for n in names],
            width,
            label=label,
        )
    left.set_yscale("log")
    left.set_ylabel("latency, ms (log scale)")
    left.set_title("Latency by algorithm (lower is better)")
    left.set_xticks(range(len(names)), names, rotation=35, ha="right")
    left.legend()
    share_width = 0.8 / max(len(backends), 1)
    for j, backend in enumerate(backends):
        right.bar(
            [x + (j - (len(backends) - 1) / 2) * share_width for x in range(len(names))],
            [results[n]["share"][backend] for n in names],
            share_width,
            label=backend,
        )
    if backends:
        right.axhline(1 / len(backends), color="black", linewidth=0.8, linestyle="--")
    right.set_ylabel("share of requests")
    right.set_title("Load share per backend (dashed: an even share)")
    right.set_xticks(range(len(names)), names, rotation=35, ha="right")
    right.legend(title="backend", fontsize="small")
    figure.suptitle(
        f"balancekit simulate: {report['scenario']}, {report['requests']:,} requests, "
        f"seed {report['seed']}"
    )
    figure.tight_layout()
    figure.savefig(path, format="png")
    plt.close(figure)
