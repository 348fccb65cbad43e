"""Backends and their live state.

The core keeps every counter here; algorithms read them and never write
them (as HAProxy's server counters belong to the core, not to ``lb_ops``).
"""

from __future__ import annotations

import enum
import time
from collections import deque
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from ._upstream_tls import UpstreamTLS

#: Weight of the newest sample in the latency moving average.
EWMA_ALPHA = 0.3
#: The least latency a failed request is recorded with.
FAILURE_LATENCY_MS = 1000.0


#: Latency samples kept per backend for the status page's p50 and p99.
RECENT_SAMPLES = 512


def percentile(ordered: list[float], q: float) -> float | None:
    """The ``q`` quantile (0 to 1) of sorted samples, nearest rank; None if none."""
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


class BackendState(enum.StrEnum):
    """What status.json shows; a backend in several states shows the first."""

    DISABLED = "disabled"
    DRAINING = "draining"
    UNHEALTHY = "unhealthy"
    EJECTED = "ejected"
    HEALTHY = "healthy"


class Backend:
    """One upstream server of a pool.

    ``url``, ``weight`` and ``backup`` come from the configuration; the
    counters ``active_requests``, ``requests_total``, ``failures_total`` and
    ``latency_ewma_ms`` (None before the first sample) are kept live.
    """

    __slots__ = (
        "active_requests",
        "backup",
        "base_path",
        "consecutive_failures",
        "draining",
        "effective_weight",
        "ejected_until",
        "ejections",
        "enabled",
        "failures_total",
        "healthy",
        "host",
        "last_check_at",
        "last_check_ok",
        "host_header",
        "host_header_raw",
        "latency_at",
        "latency_ewma_ms",
        "origin",
        "port",
        "ramp_started",
        "recent_ms",
        "released_total",
        "removed",
        "requests_total",
        "returned_at",
        "scheme",
        "source",
        "state_since",
        "tls",
        "url",
        "weight",
    )

    def __init__(self, url: str, weight: int = 1, *, backup: bool = False) -> None:
        parts = urlsplit(url)
        self.url = url
        self.weight = weight
        #: The weight algorithms balance by: ``weight``, or less while the
        #: backend ramps up after joining (the pool's ``slow_start``).
        self.effective_weight: float = weight
        self.ramp_started = 0.0
        self.backup = backup
        self.scheme = parts.scheme
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        # Prepended to every upstream path; "" when the URL has none.
        self.base_path = parts.path.rstrip("/")
        default_port = parts.port is None
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.host_header = host if default_port else f"{host}:{self.port}"
        # IDNA for a host name in Unicode; what goes on the wire is ASCII
        ascii_host = host if host.isascii() else host.encode("idna").decode("ascii")
        self.host_header_raw = (ascii_host if default_port else f"{ascii_host}:{self.port}").encode(
            "ascii"
        )
        self.origin = f"{self.scheme}://{host}:{self.port}"
        #: The pool's TLS for an ``https://`` backend (set by its pool);
        #: None: the system's CAs and the backend's own host name.
        self.tls: UpstreamTLS | None = None
        #: Where it came from: "config" (the pool's ``backends``), "runtime"
        #: (``add_backend``, here or in another process) or "discovery".
        self.source = "config"
        self.enabled = True
        self.draining = False
        self.healthy = True
        self.removed = False
        self.ejected_until = 0.0
        #: Ejections that count toward the next one's length; one is
        #: forgiven per ``base_ejection_time`` in service (applied lazily,
        #: when the next ejection is computed: see balancekit._outlier).
        self.ejections = 0
        #: When the last ejection ended (the pool's clock), for that decay.
        self.returned_at = 0.0
        self.consecutive_failures = 0
        self.active_requests = 0
        self.requests_total = 0
        self.failures_total = 0
        #: Requests that ended (``requests_total`` counts those that began).
        self.released_total = 0
        self.latency_ewma_ms: float | None = None
        #: When the last latency sample was taken (time.monotonic()).
        self.latency_at = 0.0
        #: The last latencies (ms), for the status page's percentiles.
        self.recent_ms: deque[float] = deque(maxlen=RECENT_SAMPLES)
        #: Wall-clock time of the last state change (of creation, at first).
        self.state_since = time.time()
        #: This process's last active health check: its verdict and when.
        self.last_check_ok: bool | None = None
        self.last_check_at: float | None = None

    @property
    def state(self) -> BackendState:
        if not self.enabled:
            return BackendState.DISABLED
        if self.draining:
            return BackendState.DRAINING
        if not self.healthy:
            return BackendState.UNHEALTHY
        if self.ejected_until:
            return BackendState.EJECTED
        return BackendState.HEALTHY

    def record_latency(self, ms: float, *, failed: bool = False, at: float | None = None) -> None:
        """Feed the moving average. A failure counts as a slow answer (at
        least ``FAILURE_LATENCY_MS`` and twice the average), so a backend
        that fails fast does not look fast."""
        old = self.latency_ewma_ms
        if failed:
            ms = max(ms, FAILURE_LATENCY_MS, 2 * (old or 0.0))
        self.latency_ewma_ms = ms if old is None else old + EWMA_ALPHA * (ms - old)
        self.latency_at = time.monotonic() if at is None else at

    def as_status(self) -> dict[str, object]:
        recent = sorted(self.recent_ms)
        return {
            "url": self.url,
            "state": self.state.value,
            "weight": self.weight,
            "effective_weight": round(self.effective_weight, 3),
            "backup": self.backup,
            "source": self.source,
            "active_requests": self.active_requests,
            "requests_total": self.requests_total,
            "failures_total": self.failures_total,
            "latency_ewma_ms": (
                None if self.latency_ewma_ms is None else round(self.latency_ewma_ms, 3)
            ),
            "latency_p50_ms": _rounded(percentile(recent, 0.50)),
            "latency_p99_ms": _rounded(percentile(recent, 0.99)),
            "state_since": round(self.state_since, 3),
            "last_check": (
                None
                if self.last_check_at is None
                else {"ok": self.last_check_ok, "at": round(self.last_check_at, 3)}
            ),
        }

    def __repr__(self) -> str:
        return f"<Backend {self.url} weight={self.weight} {self.state.value}>"
