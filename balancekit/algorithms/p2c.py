"""Power of two choices (P2C) with latency x load, as Finagle and Linkerd.

Two distinct eligible backends are drawn at random; the one with the lower
EWMA latency x (in-flight + 1) wins (Mitzenmacher's two choices, scored like
Finagle's peak-EWMA balancer). A backend without a sample scores zero, so
it is tried; failures count as slow answers; samples age as in
``least_response_time``.
"""

from __future__ import annotations

import random as _random
import time
from collections.abc import Callable, Sequence

from .._backend import Backend
from .._request import RequestInfo
from .base import Algorithm
from .least_response_time import effective_latency


class PowerOfTwoChoices(Algorithm):
    name = "p2c"

    def __init__(
        self,
        *,
        decay: float = 10.0,
        rng: _random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not decay > 0:
            raise ValueError(f"decay: must be a positive number of seconds, got {decay!r}")
        self.decay = decay
        self._rng = rng or _random.Random()
        self._clock = clock

    def _score(self, backend: Backend, now: float) -> float:
        latency = max(effective_latency(backend, now, self.decay), 0.0)
        return latency * (backend.active_requests + 1)

    def pick(self, backends: Sequence[Backend], request: RequestInfo) -> Backend:
        count = len(backends)
        if count == 1:
            return backends[0]
        first = int(self._rng.random() * count)
        second = int(self._rng.random() * (count - 1))
        if second >= first:
            second += 1
        a, b = backends[first], backends[second]
        now = self._clock()
        return b if self._score(b, now) < self._score(a, now) else a
