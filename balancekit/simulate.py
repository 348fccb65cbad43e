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
"""

from __future__ import annotations

import bisect
import heapq
import math
import random
import tomllib
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, field_validator

from ._backend import Backend, percentile
from ._config import OutlierDetectionConfig, PoolConfig, PositiveInt, Schema, nest, validate
from ._exceptions import ConfigError, NoEligibleBackend, Problem
from ._plugins import build_plugin
from ._pool import Pool
from ._request import RequestInfo

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

    def as_dict(self) -> dict[str, Any]:
        return {
            "p50_ms": round(self.p50_ms, 3),
            "p95_ms": round(self.p95_ms, 3),
            "p99_ms": round(self.p99_ms, 3),
            "mean_ms": round(self.mean_ms, 3),
            "error_rate": round(self.error_rate, 6),
            "share": {name: round(value, 6) for name, value in self.share.items()},
            "max_share_ratio": round(self.max_share_ratio, 4),
        }


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
        }
    )
    return Pool("simulated", config, algorithm, clock=clock)


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
    now = 0.0

    def clock() -> float:
        return now

    rng = random.Random(seed)
    # The split has its own stream, so that the arrivals and service times
    # are the same whatever the number of balancers: a comparison of 1 and
    # N balancers differs by the balancing only (common random numbers).
    split = random.Random(f"{seed}/balancers").random
    options = scenario.algorithm_options.get(algorithm.name, {})
    # Balancer 0 seeds its algorithm as a lone balancer always did.
    pools = [
        _pool(scenario, construct(algorithm, options, clock, seed + 1 + k), clock)
        for k in range(count)
    ]
    models = scenario.backends
    server = {b: j for pool in pools for j, b in enumerate(pool.backends)}
    owner = {b: pool for pool in pools for b in pool.backends}
    samplers = [_sampler(model, rng) for model in models]
    gray = [model.slow_share > 0 for model in models]
    free = [model.slots for model in models]
    waiting: list[deque[tuple[Backend, float, float, bool]]] = [deque() for _ in models]
    queues = _QueueLengths(len(models))
    arrivals = _Arrivals(_base_rate(scenario, load), scenario.phases, rng)
    make_request = _request_maker(scenario, rng)
    served = [0] * len(models)
    latencies: list[float] = []
    errors = 0
    # (time, sequence, backend or None for an arrival, arrived at, failed)
    events: list[tuple[float, int, Backend | None, float, bool]] = [
        (arrivals.after(0.0), 0, None, 0.0, False)
    ]
    sequence = 1
    arrived = 0

    def start(backend: Backend, j: int, arrived_at: float, service: float, fails: bool) -> None:
        nonlocal sequence
        if gray[j] and models[j].slow_at(now):
            service *= models[j].slow_factor
        heapq.heappush(events, (now + service, sequence, backend, arrived_at, fails))
        sequence += 1

    while events:
        now, _, backend, started, failed = heapq.heappop(events)
        if backend is None:  # an arrival
            arrived += 1
            if arrived < requests:
                heapq.heappush(events, (arrivals.after(now), sequence, None, 0.0, False))
                sequence += 1
            else:
                queues.stop(now)
            request = make_request()
            pool = pools[int(split() * count)] if count > 1 else pools[0]
            try:
                chosen = pool.acquire(request)
            except NoEligibleBackend:
                errors += 1
                continue
            j = server[chosen]
            served[j] += 1
            queues.change(j, now, 1)
            model = models[j]
            fails = model.failure_rate > 0 and rng.random() < model.failure_rate
            service = model.failure_latency_ms / 1000 if fails else samplers[j]()
            if free[j]:
                free[j] -= 1
                start(chosen, j, now, service, fails)
            else:
                waiting[j].append((chosen, now, service, fails))
            continue
        # a request ends on ``backend``
        j = server[backend]
        queues.change(j, now, -1)
        elapsed_ms = (now - started) * 1000
        owner[backend].release(backend, ok=not failed, latency_ms=elapsed_ms)
        if failed:
            errors += 1
        else:
            latencies.append(elapsed_ms)
        if waiting[j]:
            chosen, queued_at, service, fails = waiting[j].popleft()
            start(chosen, j, queued_at, service, fails)
        else:
            free[j] += 1
    return _result(latencies, errors, requests, models, served, queues)


def _result(
    latencies: list[float],
    errors: int,
    requests: int,
    models: Sequence[BackendModel],
    served: Sequence[int],
    queues: _QueueLengths,
) -> Result:
    latencies.sort()
    total = sum(served) or 1
    share = {model.name: count / total for model, count in zip(models, served, strict=True)}
    mean_share = 1 / len(share)
    return Result(
        p50_ms=percentile(latencies, 0.50) or 0.0,
        p95_ms=percentile(latencies, 0.95) or 0.0,
        p99_ms=percentile(latencies, 0.99) or 0.0,
        mean_ms=sum(latencies) / len(latencies) if latencies else 0.0,
        error_rate=errors / requests,
        share=share,
        max_share_ratio=max(share.values()) / mean_share,
        queue_tail=queues.tail(),
        max_queue=queues.most,
    )


def run(
    scenario: Scenario,
    algorithms: Mapping[str, type[Any]],
    *,
    requests: int = 100_000,
    load: float | None = None,
    seed: int = 1,
    balancers: int | None = None,
) -> dict[str, Any]:
    """Every algorithm on ``scenario``: the ``--json`` document of the
    command, with ``"balancers"`` when there are several."""
    count = scenario.balancers if balancers is None else balancers
    results = {
        name: simulate(
            scenario, cls, requests=requests, load=load, seed=seed, balancers=count
        ).as_dict()
        for name, cls in algorithms.items()
    }
    report: dict[str, Any] = {"scenario": scenario.name, "seed": seed, "requests": requests}
    if count != 1:
        report["balancers"] = count
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
