"""Outlier ejection, as Envoy's outlier detection.

Three detectors take a backend out for a while:

- **consecutive failures**: ``consecutive_failures`` failures in a row
  (Envoy's ``consecutive_5xx``), checked as each request ends;
- **success rate** (``success_rate`` table): every ``interval`` seconds,
  among the backends with at least ``request_volume`` answers in it (when
  there are ``minimum_hosts`` of them), those whose success rate is below
  ``mean - stdev_factor x stdev``;
- **failure percentage** (``failure_percentage`` table): likewise, those
  whose share of failures is ``threshold`` percent or more.

The n-th ejection of a backend lasts ``base_ejection_time x 2^(n-1)``, at
most ``max_ejection_time``; n falls back by one for every
``base_ejection_time`` the backend has been back in service without a new
ejection (Envoy's multiplier decay). That decay is applied lazily, when the
next ejection is computed, from the time the last one ended, so no timer
runs for it. At most ``max_ejection_percent`` of a pool's backends are out
at once.

The interval detectors count nothing of their own: a backend's
``released_total`` and ``failures_total`` only grow, so an interval's
counts are their growth since the interval began. The pool evaluates an
interval lazily, from the request path, when it is due. The pool calls
everything here under its lock and rebuilds its tables after.
"""

from __future__ import annotations

import statistics
from typing import TYPE_CHECKING

from ._config import FailurePercentageConfig, SuccessRateConfig

if TYPE_CHECKING:
    from ._backend import Backend
    from ._config import OutlierDetectionConfig


def eject(
    config: OutlierDetectionConfig, backend: Backend, backends: list[Backend], now: float
) -> float | None:
    """Eject ``backend`` if its failure streak calls for it and the pool's
    cap allows: the ejection's length in seconds, or None."""
    if backend.consecutive_failures < config.consecutive_failures:
        return None
    return take_out(config, backend, backends, now)


def take_out(
    config: OutlierDetectionConfig, backend: Backend, backends: list[Backend], now: float
) -> float | None:
    """Eject ``backend`` now, whatever the detector, if it is in and the
    pool's cap allows: the ejection's length in seconds, or None."""
    if backend.ejected_until or backend.removed:
        return None
    ejected = sum(1 for b in backends if b.ejected_until)
    if (ejected + 1) * 100 > config.max_ejection_percent * len(backends):
        return None
    backend.ejections = decayed(config, backend, now) + 1
    duration = float(
        min(config.base_ejection_time * 2 ** (backend.ejections - 1), config.max_ejection_time)
    )
    backend.ejected_until = now + duration
    backend.consecutive_failures = 0
    return duration


def decayed(config: OutlierDetectionConfig, backend: Backend, now: float) -> int:
    """``backend.ejections`` less one for every ``base_ejection_time`` it has
    been back in service since its last ejection ended."""
    if not backend.ejections:
        return 0
    served = now - backend.returned_at
    return max(0, backend.ejections - int(served // config.base_ejection_time))


def eject_for(backend: Backend, seconds: float, now: float) -> bool:
    """Eject ``backend`` for what is left of another process's ejection;
    whether that keeps it out longer than it already is."""
    until = now + seconds
    if seconds <= 0 or backend.removed or backend.ejected_until >= until:
        return False
    backend.ejected_until = until
    return True


def expire(backends: list[Backend], now: float) -> list[Backend]:
    """Bring back the backends whose ejection is over; they are returned."""
    back = [b for b in backends if b.ejected_until and b.ejected_until <= now]
    for backend in back:
        # In service from when the ejection ended, even if noticed later.
        backend.returned_at = backend.ejected_until
        backend.ejected_until = 0.0
    return back


class Interval:
    """One interval detector's clock and counts: when it is due next, and
    every backend's totals when the current interval began."""

    __slots__ = ("config", "due", "_start")

    def __init__(self, config: SuccessRateConfig | FailurePercentageConfig, now: float) -> None:
        self.config = config
        self.due = now + config.interval
        self._start: dict[Backend, tuple[int, int]] = {}

    def close(self, backends: list[Backend], now: float) -> list[tuple[Backend, int, int]]:
        """End the interval: each backend's (backend, answers, failures) in
        it, and begin the next one."""
        start = self._start
        counts = []
        for b in backends:
            answers, failures = start.get(b, (0, 0))
            counts.append((b, b.released_total - answers, b.failures_total - failures))
        self._start = {b: (b.released_total, b.failures_total) for b in backends}
        self.due = now + self.config.interval
        return counts

    def outliers(self, counts: list[tuple[Backend, int, int]]) -> list[tuple[Backend, str]]:
        """The backends this detector would eject, worst first, each with
        the reason to log."""
        config = self.config
        volume = [(b, n, f) for b, n, f in counts if n >= config.request_volume]
        if len(volume) < config.minimum_hosts:
            return []
        if isinstance(config, SuccessRateConfig):
            return success_rate_outliers(config, volume)
        return failure_percentage_outliers(config, volume)


def success_rate_outliers(
    config: SuccessRateConfig, counts: list[tuple[Backend, int, int]]
) -> list[tuple[Backend, str]]:
    """Backends whose success rate is below ``mean - stdev_factor x stdev``
    (the population's, as Envoy computes it), lowest first."""
    rates = [(b, 100.0 * (n - f) / n) for b, n, f in counts]
    values = [rate for _, rate in rates]
    mean = statistics.fmean(values)
    threshold = mean - config.stdev_factor * statistics.pstdev(values, mean)
    low = sorted((item for item in rates if item[1] < threshold), key=lambda item: item[1])
    return [(b, f"success rate {rate:.1f}% below the pool's {threshold:.1f}%") for b, rate in low]


def failure_percentage_outliers(
    config: FailurePercentageConfig, counts: list[tuple[Backend, int, int]]
) -> list[tuple[Backend, str]]:
    """Backends with ``threshold`` percent of failures or more, most first."""
    shares = [(b, 100.0 * f / n) for b, n, f in counts]
    high = sorted(
        (item for item in shares if item[1] >= config.threshold), key=lambda item: -item[1]
    )
    return [(b, f"{share:.1f}% of its requests failed") for b, share in high]
