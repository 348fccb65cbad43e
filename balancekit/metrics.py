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
  ``balancekit_health_check_duration_seconds``.

Several worker processes: set ``PROMETHEUS_MULTIPROC_DIR`` (an empty
directory shared by the workers) before they start, as prometheus-client's
multiprocess mode asks; the ``metrics`` path then adds up every worker's
values. Each Balancer has its own registry (``balancer.metrics.registry``);
pass ``Balancer(..., metrics_registry=REGISTRY)`` to put balancekit's
metrics in your app's registry instead.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._backend import Backend, BackendState

#: Upstream time buckets, seconds: from a cache hit to a slow report.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
HEALTH_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0)


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
        r = self.registry
        labels = ("pool", "backend")
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
        self.up = Gauge(
            "balancekit_backend_up",
            "1 while the backend is healthy.",
            labels,
            registry=r,
            multiprocess_mode="liveall",
        )
        self.duration = Histogram(
            "balancekit_request_duration_seconds",
            "Upstream time of proxied requests.",
            labels,
            buckets=BUCKETS,
            registry=r,
        )
        self.retries = Counter("balancekit_retries", "Retries started.", ("pool",), registry=r)
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
        return PoolMetrics(self, name)

    def exposition(self) -> tuple[bytes, bytes]:
        """The ``metrics`` answer: body and content type."""
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

        registry = self.registry
        if self.multiprocess:
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST.encode()


class PoolMetrics:
    """One pool's metrics, with each backend's label children made once."""

    def __init__(self, metrics: Metrics, pool: str) -> None:
        self.metrics = metrics
        self.pool = pool
        self.retries = metrics.retries.labels(pool)
        self._children: dict[Backend, tuple[Any, Any, dict[int, Any]]] = {}

    def _for(self, backend: Backend) -> tuple[Any, Any, dict[int, Any]]:
        children = self._children.get(backend)
        if children is None:
            m = self.metrics
            labels = (self.pool, backend.url)
            children = (m.active.labels(*labels), m.duration.labels(*labels), {})
            self._children[backend] = children
            m.up.labels(*labels).set(1 if backend.state.value == "healthy" else 0)
        return children

    def acquired(self, backend: Backend) -> None:
        self._for(backend)[0].inc()

    def released(self, backend: Backend, code: int, seconds: float | None) -> None:
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

    def ejected(self, backend: Backend) -> None:
        self.metrics.ejections.labels(self.pool, backend.url).inc()

    def state_changed(self, backend: Backend, state: BackendState) -> None:
        labels = (self.pool, backend.url)
        self.metrics.state_changes.labels(*labels, state.value).inc()
        self.metrics.up.labels(*labels).set(1 if state.value == "healthy" else 0)

    def health_checked(self, backend: Backend, seconds: float) -> None:
        self.metrics.health_duration.labels(self.pool, backend.url).observe(seconds)
