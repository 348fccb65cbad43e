"""Least response time: the lowest moving average (EWMA) of response time.

Backends without a sample are tried first, in turn. Failures are recorded
as slow answers by the core, so a backend that fails fast does not attract
traffic. A sample ages: the average used here decays toward zero with the
time since it was taken (half-life ``decay`` seconds), so a backend that was
slow once is tried again later and can win back traffic when it recovered,
instead of being judged on a stale sample forever (as Finagle's and
Linkerd's peak-EWMA decay).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from .._backend import Backend
from .._request import RequestInfo
from .base import Algorithm


def effective_latency(backend: Backend, now: float, half_life: float) -> float:
    """The backend's EWMA, halved for every ``half_life`` seconds without a sample."""
    ewma = backend.latency_ewma_ms
    if ewma is None:
        return -1.0  # no sample yet: first in line
    age = now - backend.latency_at
    return ewma * 0.5 ** (age / half_life) if age > 0 else ewma


class LeastResponseTime(Algorithm):
    name = "least_response_time"

    def __init__(self, *, decay: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        if not decay > 0:
            raise ValueError(f"decay: must be a positive number of seconds, got {decay!r}")
        self.decay = decay
        self._clock = clock
        self._start = 0

    def pick(self, backends: Sequence[Backend], request: RequestInfo) -> Backend:
        now = self._clock()
        count = len(backends)
        start = self._start % count
        self._start = start + 1
        best = backends[start]
        best_score = effective_latency(best, now, self.decay)
        for i in range(start + 1, start + count):
            backend = backends[i % count]
            score = effective_latency(backend, now, self.decay)
            if score < best_score:
                best, best_score = backend, score
        return best
