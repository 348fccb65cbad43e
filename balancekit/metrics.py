"""Prometheus metrics (extra ``prometheus``), served as ``metrics`` under the status path.

Every name starts with ``balancekit_`` and carries ``pool`` and ``backend``
labels (``pool`` alone where no backend is involved):

- ``balancekit_requests_total{code}``: proxied requests by the status the
  client got (the upstream's, or 502/504 from balancekit; 499 when the
  client left first);
- ``balancekit_active_requests``: in flight now;
- ``balancekit_backend_up``: 1 while the backend is healthy, else 0;
- ``balancekit_request_duration_seconds``: histogram of upstream time;
- ``balancekit_retries_total``, ``balancekit_ejections_total``,
  ``balancekit_state_changes_total{state}``,
  ``balancekit_health_check_duration_seconds``;
- ``balancekit_hedges_total`` and ``balancekit_hedge_wins_total`` (``pool``):
  hedged tries started, and requests a hedged try answered first;
- ``balancekit_no_backend_total`` (``pool``): 503s answered for want of an
  eligible backend, a full queue or a ``queue_timeout`` included;
- ``balancekit_discovery_errors_total`` (``pool``): discovery rounds that
  failed (the pool kept its last good set);
- ``balancekit_pool_eligible_backends``, ``balancekit_pool_panic`` (0/1),
  ``balancekit_queue_length`` and, with ``adaptive_concurrency``,
  ``balancekit_pool_concurrency_limit`` (``pool``): read from the pools when the
  ``metrics`` path is read, never kept up per request.

In one process, the per-request families (requests, active requests,
durations) are plain counters that a collector turns into samples when the
``metrics`` path is read: a request costs a few integer additions under one
lock rather than five prometheus-client updates. Several worker processes:
set ``PROMETHEUS_MULTIPROC_DIR`` (an empty directory shared by the workers)
before they start, as prometheus-client's multiprocess mode asks; every
family then goes through prometheus-client's shared files, and the
``metrics`` path adds up every worker's values. The pool gauges cannot be
read from other processes at scrape time, so there each worker writes its
own every ``REFRESH_SECONDS`` (a daemon thread started with the balancer's
background work, after the fork) and the worker answering a scrape writes
its own first; the answer gives the fewest eligible backends any worker
sees (``livemin``), panic if any worker is in it (``livemax``) and the
requests queued in all of them (``livesum``).

Each Balancer has its own registry (``balancer.metrics.registry``); pass
``Balancer(..., metrics_registry=REGISTRY)`` to put balancekit's metrics in
your app's registry instead.
"""

from __future__ import annotations

import bisect
import logging
import os
import threading
import time
import weakref
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from ._backend import Backend, BackendState
    from ._pool import Pool

logger = logging.getLogger("balancekit")

#: Upstream time buckets, seconds: from a cache hit to a slow report.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
HEALTH_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0)
#: Several worker processes: how often each one writes its pool gauges.
REFRESH_SECONDS = 1.0

ELIGIBLE_HELP = "Backends that may take traffic: enabled, not draining, healthy, not ejected."
PANIC_HELP = "1 while the pool is in panic mode (balancing over unhealthy backends too)."
QUEUE_HELP = "Requests waiting in the pool's queue (max_pending)."
LIMIT_HELP = "The pool's adaptive limit on requests in flight (adaptive_concurrency)."


class _HasPools(Protocol):
    @property
    def pools(self) -> Mapping[str, Pool]: ...


def available() -> bool:
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        return False
    return True


class Metrics:
    """The metric families of one Balancer."""

    def __init__(self, registry: Any = None) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = registry if registry is not None else CollectorRegistry()
        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        self.pools: dict[str, PoolMetrics] = {}
        r = self.registry
        labels = ("pool", "backend")
        if self.multiprocess:
            self.requests = Counter(
                "balancekit_requests", "Proxied requests.", (*labels, "code"), registry=r
            )
            self.active = Gauge(
                "balancekit_active_requests",
                "Requests in flight.",
                labels,
                registry=r,
                multiprocess_mode="livesum",
            )
            self.duration = Histogram(
                "balancekit_request_duration_seconds",
                "Upstream time of proxied requests.",
                labels,
                buckets=BUCKETS,
                registry=r,
            )
            self.eligible = Gauge(
                "balancekit_pool_eligible_backends",
                ELIGIBLE_HELP,
                ("pool",),
                registry=r,
                multiprocess_mode="livemin",
            )
            self.panic = Gauge(
                "balancekit_pool_panic",
                PANIC_HELP,
                ("pool",),
                registry=r,
                multiprocess_mode="livemax",
            )
            self.queue = Gauge(
                "balancekit_queue_length",
                QUEUE_HELP,
                ("pool",),
                registry=r,
                multiprocess_mode="livesum",
            )
            self.limit = Gauge(
                "balancekit_pool_concurrency_limit",
                LIMIT_HELP,
                ("pool",),
                registry=r,
                multiprocess_mode="livesum",
            )
        else:
            r.register(_RequestCollector(self))
            r.register(_PoolCollector(self))
        self._owner: weakref.ref[_HasPools] | None = None
        self._refreshing_pid = 0
        self.up = Gauge(
            "balancekit_backend_up",
            "1 while the backend is healthy.",
            labels,
            registry=r,
            multiprocess_mode="liveall",
        )
        self.retries = Counter("balancekit_retries", "Retries started.", ("pool",), registry=r)
        self.hedges = Counter(
            "balancekit_hedges", "Hedged tries started (hedge).", ("pool",), registry=r
        )
        self.hedge_wins = Counter(
            "balancekit_hedge_wins",
            "Requests answered by a hedged try rather than the first.",
            ("pool",),
            registry=r,
        )
        self.no_backend = Counter(
            "balancekit_no_backend",
            "503s answered for want of an eligible backend (a full queue included).",
            ("pool",),
            registry=r,
        )
        self.discovery_errors = Counter(
            "balancekit_discovery_errors",
            "Discovery rounds that failed; the pool kept its last good set.",
            ("pool",),
            registry=r,
        )
        self.ejections = Counter("balancekit_ejections", "Outlier ejections.", labels, registry=r)
        self.state_changes = Counter(
            "balancekit_state_changes", "Backend state changes.", (*labels, "state"), registry=r
        )
        self.health_duration = Histogram(
            "balancekit_health_check_duration_seconds",
            "Active health check time.",
            labels,
            buckets=HEALTH_BUCKETS,
            registry=r,
        )

    def pool(self, name: str) -> PoolMetrics:
        """The pool's metrics; a pool that comes back after a reload keeps
        counting where it left off, as its label children would."""
        pool = self.pools.get(name)
        if pool is None:
            pool = self.pools[name] = PoolMetrics(self, name)
        return pool

    def bind(self, owner: _HasPools) -> None:
        """Read the pool gauges from ``owner.pools`` (the Balancer: its pools
        of the moment, after a reload too). Held weakly: a registry shared
        with the app does not keep a Balancer alive."""
        self._owner = weakref.ref(owner)

    def current_pools(self) -> list[Pool]:
        owner = self._owner() if self._owner is not None else None
        return [] if owner is None else list(owner.pools.values())

    def start(self) -> None:
        """Several worker processes: write this process's pool gauges now
        and every ``REFRESH_SECONDS`` from a daemon thread (once per process;
        called with the balancer's background work, after a fork)."""
        if not self.multiprocess or self._refreshing_pid == os.getpid():
            return
        # Two loops starting at once may make two threads: harmless.
        self._refreshing_pid = os.getpid()
        self.refresh()
        thread = threading.Thread(
            target=_refresh_forever,
            args=(weakref.ref(self),),
            name="balancekit-metrics",
            daemon=True,
        )
        thread.start()

    def refresh(self) -> None:
        """Several worker processes: write this process's pool gauges."""
        if not self.multiprocess:
            return
        for pool in self.current_pools():
            name = pool.name
            self.eligible.labels(name).set(pool.eligible_backends)
            self.panic.labels(name).set(1 if pool.panic else 0)
            self.queue.labels(name).set(pool.queued)
            if pool.adaptive is not None:
                self.limit.labels(name).set(pool.adaptive.limit)

    def exposition(self) -> tuple[bytes, bytes]:
        """The ``metrics`` answer: body and content type."""
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

        registry = self.registry
        if self.multiprocess:
            from prometheus_client import multiprocess

            self.refresh()  # this worker's gauges as of now
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST.encode()


class _BackendCounts:
    """One backend's per-request counts, kept as plain numbers."""

    __slots__ = ("active", "buckets", "codes", "count", "total")

    def __init__(self) -> None:
        self.active = 0
        self.codes: dict[int, int] = {}
        self.buckets = [0] * (len(BUCKETS) + 1)  # the last one is +Inf
        self.count = 0
        self.total = 0.0


class PoolMetrics:
    """One pool's metrics, with each backend's label children made once."""

    def __init__(self, metrics: Metrics, pool: str) -> None:
        self.metrics = metrics
        self.pool = pool
        self.retries = metrics.retries.labels(pool)
        self.hedges = metrics.hedges.labels(pool)
        self.hedge_wins = metrics.hedge_wins.labels(pool)
        self.no_backends = metrics.no_backend.labels(pool)
        self.discovery_errors = metrics.discovery_errors.labels(pool)
        self.counts: dict[str, _BackendCounts] = {}  # by URL: a reload makes new Backends
        self._lock = threading.Lock()  # the WSGI engine releases from many threads
        self._children: dict[Backend, tuple[Any, Any, dict[int, Any]]] = {}

    def _for(self, backend: Backend) -> tuple[Any, Any, dict[int, Any]]:
        children = self._children.get(backend)
        if children is None:
            m = self.metrics
            labels = (self.pool, backend.url)
            if m.multiprocess:
                children = (m.active.labels(*labels), m.duration.labels(*labels), {})
            else:
                children = (None, None, {})
            self._children[backend] = children
            m.up.labels(*labels).set(1 if backend.state.value == "healthy" else 0)
        return children

    def _counts(self, backend: Backend) -> _BackendCounts:
        counts = self.counts.get(backend.url)
        if counts is None:
            self._for(backend)
            counts = self.counts[backend.url] = _BackendCounts()
        return counts

    def acquired(self, backend: Backend) -> None:
        if self.metrics.multiprocess:
            self._for(backend)[0].inc()
            return
        with self._lock:
            self._counts(backend).active += 1

    def released(self, backend: Backend, code: int, seconds: float | None) -> None:
        if self.metrics.multiprocess:
            self._released_shared(backend, code, seconds)
            return
        with self._lock:
            counts = self._counts(backend)
            counts.active -= 1
            if seconds is not None:
                counts.buckets[bisect.bisect_left(BUCKETS, seconds)] += 1
                counts.count += 1
                counts.total += seconds
            counts.codes[code] = counts.codes.get(code, 0) + 1

    def _released_shared(self, backend: Backend, code: int, seconds: float | None) -> None:
        active, duration, codes = self._for(backend)
        active.dec()
        if seconds is not None:
            duration.observe(seconds)
        counter = codes.get(code)
        if counter is None:
            counter = codes[code] = self.metrics.requests.labels(self.pool, backend.url, str(code))
        counter.inc()

    def retried(self) -> None:
        self.retries.inc()

    def hedged(self) -> None:
        self.hedges.inc()

    def hedge_won(self) -> None:
        self.hedge_wins.inc()

    def no_backend(self) -> None:
        """A 503 answered for want of an eligible backend (none eligible,
        a full queue, or ``queue_timeout`` spent waiting)."""
        self.no_backends.inc()

    def discovery_failed(self) -> None:
        """A discovery round failed (the last good set was kept)."""
        self.discovery_errors.inc()

    def ejected(self, backend: Backend) -> None:
        self.metrics.ejections.labels(self.pool, backend.url).inc()

    def state_changed(self, backend: Backend, state: BackendState) -> None:
        labels = (self.pool, backend.url)
        self.metrics.state_changes.labels(*labels, state.value).inc()
        self.metrics.up.labels(*labels).set(1 if state.value == "healthy" else 0)

    def health_checked(self, backend: Backend, seconds: float) -> None:
        self.metrics.health_duration.labels(self.pool, backend.url).observe(seconds)


class _RequestCollector:
    """Turns every pool's plain counts into samples when the registry is read."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )
        from prometheus_client.utils import floatToGoString

        labels = ["pool", "backend"]
        requests = CounterMetricFamily(
            "balancekit_requests", "Proxied requests.", labels=[*labels, "code"]
        )
        active = GaugeMetricFamily(
            "balancekit_active_requests", "Requests in flight.", labels=labels
        )
        duration = HistogramMetricFamily(
            "balancekit_request_duration_seconds",
            "Upstream time of proxied requests.",
            labels=labels,
        )
        bounds = [floatToGoString(b) for b in BUCKETS] + ["+Inf"]  # type: ignore[no-untyped-call]
        for pool in list(self.metrics.pools.values()):
            with pool._lock:
                snapshot = [
                    (url, c.active, dict(c.codes), list(c.buckets), c.total)
                    for url, c in pool.counts.items()
                ]
            for url, in_flight, codes, buckets, total in snapshot:
                for code, value in sorted(codes.items()):
                    requests.add_metric([pool.pool, url, str(code)], value)
                active.add_metric([pool.pool, url], in_flight)
                cumulative, running = [], 0
                for bound, value in zip(bounds, buckets, strict=True):
                    running += value
                    cumulative.append((bound, running))
                duration.add_metric([pool.pool, url], cumulative, total)
        yield requests
        yield active
        yield duration


class _PoolCollector:
    """The pool gauges, read from the pools when the registry is read (one process)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        eligible = GaugeMetricFamily(
            "balancekit_pool_eligible_backends", ELIGIBLE_HELP, labels=["pool"]
        )
        panic = GaugeMetricFamily("balancekit_pool_panic", PANIC_HELP, labels=["pool"])
        queue = GaugeMetricFamily("balancekit_queue_length", QUEUE_HELP, labels=["pool"])
        limit = GaugeMetricFamily("balancekit_pool_concurrency_limit", LIMIT_HELP, labels=["pool"])
        for pool in self.metrics.current_pools():
            eligible.add_metric([pool.name], pool.eligible_backends)
            panic.add_metric([pool.name], 1 if pool.panic else 0)
            queue.add_metric([pool.name], pool.queued)
            if pool.adaptive is not None:
                limit.add_metric([pool.name], pool.adaptive.limit)
        yield eligible
        yield panic
        yield queue
        yield limit


def _refresh_forever(metrics: weakref.ref[Metrics]) -> None:
    # The refresher of one worker process; ends with its Metrics. A failure
    # is logged once, and the next round tries again.
    logged = False
    while True:
        time.sleep(REFRESH_SECONDS)
        current = metrics()
        if current is None:
            return
        try:
            current.refresh()
        except Exception:
            if not logged:
                logger.exception("balancekit: writing the pool gauges failed")
                logged = True
        del current
