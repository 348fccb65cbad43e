"""``balancekit simulate``: which algorithm for which workload, in numbers.

A discrete-event simulation with no sockets, threads or sleeping. Backends
are servers with a number of concurrent slots and a service-time
distribution, queueing what they cannot start (FIFO); requests arrive as a
Poisson stream at ``load`` times the fleet's capacity. Every pick goes
through a real :class:`~balancekit._pool.Pool` and the real algorithm
object, on a clock the simulation moves, so in-flight counts, latency
averages, failures and (when configured) outlier ejection feed the
algorithm exactly as in the proxy. The same seed gives the same numbers.
"""

from __future__ import annotations

import bisect
import heapq
import math
import random
import tomllib
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, field_validator

from ._backend import percentile
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
    ``failure_rate`` of requests fail after ``failure_latency_ms``."""

    name: str
    slots: int = 4
    latency_ms: float = 10.0
    distribution: str = "exponential"
    sigma: float = 0.5  # lognormal only: the spread of the log
    failure_rate: float = 0.0
    failure_latency_ms: float = 1.0
    weight: int = 1

    @property
    def url(self) -> str:
        return f"http://{self.name}"

    @property
    def capacity(self) -> float:
        """Requests per second it can serve at most."""
        mean_s = (
            (1 - self.failure_rate) * self.latency_ms + self.failure_rate * self.failure_latency_ms
        ) / 1000
        return self.slots / mean_s


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    backends: tuple[BackendModel, ...]
    load: float = 0.7
    #: ``None``: requests come from ``CLIENTS`` addresses; a number: each
    #: carries ``X-User``, drawn from that many keys by Zipf's law (s = 1.1).
    hot_keys: int | None = None
    #: Options per algorithm name (a scenario file's ``[algorithms.NAME]``).
    algorithm_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    outlier_detection: Mapping[str, Any] | None = None


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


def construct(
    cls: type[Any], options: Mapping[str, Any], clock: Callable[[], float], seed: int
) -> Any:
    """An algorithm built as the Balancer builds it, its seams filled in:
    the simulation's clock, and a seeded ``rng`` for the random ones."""
    path = f"algorithms.{cls.name}"
    return build_plugin(cls, options, path, clock=clock, rng=random.Random(seed))


def simulate(
    scenario: Scenario,
    algorithm: type[Any],
    *,
    requests: int = 100_000,
    load: float | None = None,
    seed: int = 1,
) -> Result:
    """Run ``requests`` requests of ``scenario`` through ``algorithm``."""
    now = 0.0

    def clock() -> float:
        return now

    rng = random.Random(seed)
    options = scenario.algorithm_options.get(algorithm.name, {})
    instance = construct(algorithm, options, clock, seed + 1)
    config = PoolConfig.model_validate(
        {
            "backends": [{"url": b.url, "weight": b.weight} for b in scenario.backends],
            "max_connections": 10**9,  # the models queue; nothing is refused
            "outlier_detection": scenario.outlier_detection,
        }
    )
    pool = Pool("simulated", config, instance, clock=clock)
    models = dict(zip(pool.backends, scenario.backends, strict=True))
    samplers = {backend: _sampler(model, rng) for backend, model in models.items()}
    free = {backend: model.slots for backend, model in models.items()}
    waiting: dict[Any, deque[tuple[float, float, bool]]] = {b: deque() for b in models}
    rate = (scenario.load if load is None else load) * sum(m.capacity for m in scenario.backends)

    clients = [f"10.{i // 250}.{i % 250}.1" for i in range(CLIENTS)]
    cdf = _zipf_cdf(scenario.hot_keys) if scenario.hot_keys else None
    served = dict.fromkeys(models, 0)
    latencies: list[float] = []
    errors = 0
    # (time, sequence, backend or None for an arrival, arrived at, failed)
    events: list[tuple[float, int, Any, float, bool]] = [
        (rng.expovariate(rate), 0, None, 0.0, False)
    ]
    sequence = 1
    arrived = 0
    while events:
        now, _, backend, started, failed = heapq.heappop(events)
        if backend is None:  # an arrival
            arrived += 1
            if arrived < requests:
                heapq.heappush(events, (now + rng.expovariate(rate), sequence, None, 0.0, False))
                sequence += 1
            headers = []
            if cdf is not None:
                user = bisect.bisect_left(cdf, rng.random())
                headers = [(b"x-user", str(user).encode())]
            request = RequestInfo(
                "GET", "/", headers=headers, client_ip=clients[int(rng.random() * CLIENTS)]
            )
            try:
                chosen = pool.acquire(request)
            except NoEligibleBackend:
                errors += 1
                continue
            served[chosen] += 1
            model = models[chosen]
            fails = model.failure_rate > 0 and rng.random() < model.failure_rate
            service = model.failure_latency_ms / 1000 if fails else samplers[chosen]()
            if free[chosen]:
                free[chosen] -= 1
                heapq.heappush(events, (now + service, sequence, chosen, now, fails))
                sequence += 1
            else:
                waiting[chosen].append((now, service, fails))
            continue
        # a request ends on ``backend``
        elapsed_ms = (now - started) * 1000
        pool.release(backend, ok=not failed, latency_ms=elapsed_ms)
        if failed:
            errors += 1
        else:
            latencies.append(elapsed_ms)
        queue = waiting[backend]
        if queue:
            queued_at, service, fails = queue.popleft()
            heapq.heappush(events, (now + service, sequence, backend, queued_at, fails))
            sequence += 1
        else:
            free[backend] += 1

    latencies.sort()
    total = sum(served.values()) or 1
    share = {models[b].name: count / total for b, count in served.items()}
    mean_share = 1 / len(share)
    return Result(
        p50_ms=percentile(latencies, 0.50) or 0.0,
        p95_ms=percentile(latencies, 0.95) or 0.0,
        p99_ms=percentile(latencies, 0.99) or 0.0,
        mean_ms=sum(latencies) / len(latencies) if latencies else 0.0,
        error_rate=errors / requests,
        share=share,
        max_share_ratio=max(share.values()) / mean_share,
    )


def run(
    scenario: Scenario,
    algorithms: Mapping[str, type[Any]],
    *,
    requests: int = 100_000,
    load: float | None = None,
    seed: int = 1,
) -> dict[str, Any]:
    """Every algorithm on ``scenario``: the ``--json`` document of the command."""
    results = {
        name: simulate(scenario, cls, requests=requests, load=load, seed=seed).as_dict()
        for name, cls in algorithms.items()
    }
    return {"scenario": scenario.name, "seed": seed, "requests": requests, "algorithms": results}


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


class ScenarioFile(Schema):
    """A scenario file, as :func:`load_scenario` documents it."""

    name: str | None = None
    description: str | None = None
    load: Annotated[float, AfterValidator(_load)] = 0.7
    hot_keys: PositiveInt | None = None
    backends: list[BackendTable]
    algorithms: dict[str, dict[str, Any]] = {}
    outlier_detection: OutlierDetectionConfig | None = None

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
    ScenarioFile, backends=("list", BackendTable), outlier_detection=("one", OutlierDetectionConfig)
)


def load_scenario(path: str | Path) -> Scenario:
    """A custom scenario from TOML; ConfigError naming the key path if wrong::

    name = "my-fleet"
    load = 0.8
    hot_keys = 5000              # optional: Zipf-distributed X-User keys
    [[backends]]
    name = "big"
    slots = 8
    latency_ms = 20
    distribution = "lognormal"   # exponential (default), lognormal, constant
    weight = 2
    [[backends]]
    name = "small"
    failure_rate = 0.05
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
    backends = tuple(
        BackendModel(**{**table.model_dump(), "name": table.name or f"b{i + 1}"})
        for i, table in enumerate(scenario.backends)
    )
    outlier = scenario.outlier_detection
    return Scenario(
        name=scenario.name or path.stem,
        description=scenario.description or f"from {path.name}",
        backends=backends,
        load=scenario.load,
        hot_keys=scenario.hot_keys,
        algorithm_options=scenario.algorithms,
        outlier_detection=None if outlier is None else outlier.model_dump(),
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
