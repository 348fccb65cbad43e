"""Least response time: the lowest moving average (EWMA) of response time,
weighed by the requests in flight.

A backend's score is ``ewma x (active_requests + 1)``, as NGINX's
``least_time`` weighs the time with the active connections: the average
alone herds, sending every new request to whichever backend looked fastest
a moment ago until its average catches up. Backends without a sample are
tried first, in turn. Failures are recorded as slow answers by the core,
so a backend that fails fast does not attract traffic. A sample ages: the
average used here decays toward zero with the time since it was taken
(half-life ``decay`` seconds), so a backend that was slow once is tried
again later and can win back traffic when it recovered, instead of being
judged on a stale sample forever (as Finagle's and Linkerd's peak-EWMA
decay).

No scan per pick: the decayed score is
``ewma x 2^(-(now - at) / decay) x (active + 1)``, and the factor
``2^(-now / decay)`` is common to every backend, so the order of backends
is that of ``log2(ewma) + at / decay + log2(active + 1)``, which changes
only when a request starts or ends on a backend. The backends sit in a
heap by that key, pushed again from the pool's ``acquired`` and
``released`` feedback (O(log N); superseded entries are skipped); a pick
reads the top. A call with another sequence than the pool's current
eligible tuple (a retry excluding the backends already tried, or some at
``max_connections``) scans that subset instead, by the same score.
"""

from __future__ import annotations

import heapq
import math
import time
from collections import OrderedDict
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


def load_score(backend: Backend, now: float, half_life: float) -> float:
    """``effective_latency x (active_requests + 1)``; -1 for a backend
    without a sample (it goes first, whatever its load)."""
    latency = effective_latency(backend, now, half_life)
    return latency if latency < 0 else latency * (backend.active_requests + 1)


class LeastResponseTime(Algorithm):
    name = "least_response_time"

    def __init__(self, *, decay: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        if not decay > 0:
            raise ValueError(f"decay: must be a positive number of seconds, got {decay!r}")
        self.decay = decay
        self._clock = clock
        self._start = 0
        self._backends: Sequence[Backend] = ()
        self._unsampled: OrderedDict[Backend, None] = OrderedDict()
        # (order key, sequence number, backend); an entry is current only if
        # its number is the backend's number in ``_current``.
        self._heap: list[tuple[float, int, Backend]] = []
        self._current: dict[Backend, int] = {}
        self._sequence = 0

    def _key(self, backend: Backend, ewma: float) -> float:
        return (
            math.log2(max(ewma, 1e-9))
            + backend.latency_at / self.decay
            + math.log2(backend.active_requests + 1)
        )

    def prepare(self, backends: Sequence[Backend]) -> None:
        self._backends = backends
        self._unsampled = OrderedDict((b, None) for b in backends if b.latency_ewma_ms is None)
        self._current = {}
        self._heap = [entry for b in backends if (entry := self._entry(b)) is not None]
        heapq.heapify(self._heap)

    def _entry(self, backend: Backend) -> tuple[float, int, Backend] | None:
        ewma = backend.latency_ewma_ms
        self._sequence = sequence = self._sequence + 1
        self._current[backend] = sequence
        return None if ewma is None else (self._key(backend, ewma), sequence, backend)

    def acquired(self, backend: Backend) -> None:
        self._update(backend)

    def released(self, backend: Backend) -> None:
        self._update(backend)

    def _update(self, backend: Backend) -> None:
        # Its in-flight count or its average moved: push it again by its new key.
        if backend not in self._current or backend.latency_ewma_ms is None:
            return  # not eligible now, or no sample yet
        self._unsampled.pop(backend, None)
        heap = self._heap
        entry = self._entry(backend)
        if entry is not None:
            heapq.heappush(heap, entry)
        if len(heap) > 2 * len(self._current) + 64:
            # Drop superseded entries now and then, so the heap stays O(N).
            current = self._current
            self._heap = [entry for entry in heap if current[entry[2]] == entry[1]]
            heapq.heapify(self._heap)

    def pick(self, backends: Sequence[Backend], request: RequestInfo) -> Backend:
        if backends is not self._backends:
            return self._scan(backends)
        unsampled = self._unsampled
        if unsampled:
            backend = next(iter(unsampled))
            unsampled.move_to_end(backend)  # the next pick tries another
            return backend
        heap, current = self._heap, self._current
        while True:
            _, sequence, backend = heap[0]
            if current[backend] == sequence:
                return backend
            heapq.heappop(heap)

    def _scan(self, backends: Sequence[Backend]) -> Backend:
        now = self._clock()
        count = len(backends)
        start = self._start % count
        self._start = start + 1
        best = backends[start]
        best_score = load_score(best, now, self.decay)
        for i in range(start + 1, start + count):
            backend = backends[i % count]
            score = load_score(backend, now, self.decay)
            if score < best_score:
                best, best_score = backend, score
        return best
