"""Adaptive concurrency (``adaptive_concurrency = { min_limit, max_limit,
window }``): a pool's limit on requests in flight, found from latency.

The gradient controller of Envoy's adaptive concurrency filter and of
Netflix's concurrency-limits (Gradient2), in a few lines. Every ``window``
seconds the window's sampled RTT (the median of the requests that ended in
it) is compared with the pool's minimum RTT::

    gradient = clamp(min_rtt x (1 + BUFFER) / sampled_rtt, 0.5, 2.0)
    limit    = clamp(limit x gradient + sqrt(limit), min_limit, max_limit)

While latency stays near the minimum the gradient is 1 and the limit grows
by its square root (the headroom that lets it find more capacity); when
requests start to queue at the backends, latency rises, the gradient
falls below 1 and so does the limit, before latency collapses. BUFFER
(25 %, Envoy's default) keeps ordinary jitter from reading as queueing.
The limit grows only when the window used at least half of it, so an idle
pool does not talk itself up to ``max_limit`` and then let a burst through.

The minimum RTT is measured as Envoy measures it: for one window at
``min_limit`` (at start, and again every ``MIN_RTT_INTERVAL`` windows), the
median then is the baseline. A pool that is overloaded from its first
request would otherwise never see its backends' unloaded latency, and a
backend that became slower for good (a new release, bigger answers) sets
its new baseline at the next measurement. While one runs, requests beyond
``min_limit`` queue (section 11) or are answered 503: give the pool a queue
(``max_pending``) or retries if that matters.

No I/O and no clock of its own: the pool calls :meth:`sample` on every
release, under its lock, with the time it read anyway.
"""

from __future__ import annotations

import math

#: How far above the minimum RTT a window's median may be without counting
#: as queueing (Envoy's ``min_rtt_buffer`` default).
BUFFER = 0.25
#: Windows between two measurements of the minimum RTT (Envoy: 60 s).
MIN_RTT_INTERVAL = 60
#: The limit the controller starts from, within min_limit and max_limit
#: (Netflix's initial limit).
INITIAL_LIMIT = 20
#: Samples kept per window: enough for a median, bounded per request.
MAX_SAMPLES = 1024


class AdaptiveLimit:
    """The limit of one pool, re-sampled every ``window`` seconds."""

    __slots__ = (
        "limit",
        "max_limit",
        "measuring",
        "min_limit",
        "min_rtt_ms",
        "peak",
        "window",
        "window_ends",
        "_resume",
        "_samples",
        "_since",
    )

    def __init__(self, min_limit: int, max_limit: int, window: float, now: float) -> None:
        self.min_limit = min_limit
        self.max_limit = max_limit
        self.window = window
        #: The limit in force: requests in flight beyond it queue or get 503.
        self.limit = min_limit
        #: Whether this window measures the minimum RTT (at ``min_limit``).
        self.measuring = True
        self.min_rtt_ms: float | None = None
        #: The most requests in flight seen in this window.
        self.peak = 0
        self.window_ends = now + window
        self._samples: list[float] = []
        self._resume = max(min_limit, min(max_limit, INITIAL_LIMIT))
        self._since = 0  # windows since the last measurement

    def sample(self, latency_ms: float | None, in_flight: int, now: float) -> None:
        """A request ended after ``latency_ms`` (None: no usable sample),
        with ``in_flight`` requests in flight just before it did."""
        if in_flight > self.peak:
            self.peak = in_flight
        if latency_ms is not None and len(self._samples) < MAX_SAMPLES:
            self._samples.append(latency_ms)
        if now >= self.window_ends:
            self._resample(now)

    def _resample(self, now: float) -> None:
        samples, self._samples = self._samples, []
        peak, self.peak = self.peak, 0
        self.window_ends = now + self.window
        if not samples:
            return  # nothing ended: nothing learnt (a measurement goes on)
        samples.sort()
        median = samples[len(samples) // 2]
        if self.measuring:
            self.min_rtt_ms = median
            self.measuring = False
            self.limit = self._resume
            self._since = 0
            return
        min_rtt = self.min_rtt_ms
        assert min_rtt is not None  # measured before any other window
        gradient = max(0.5, min(2.0, min_rtt * (1 + BUFFER) / median)) if median > 0 else 1.0
        limit = self.limit
        if gradient < 1.0 or peak >= limit / 2:  # grow only when the limit was what held
            new = limit * gradient + math.sqrt(limit)
            limit = self.limit = max(self.min_limit, min(self.max_limit, int(new)))
        self._since += 1
        if self._since >= MIN_RTT_INTERVAL:
            self.measuring = True
            self._resume = limit
            self.limit = self.min_limit


__all__ = ["AdaptiveLimit"]
