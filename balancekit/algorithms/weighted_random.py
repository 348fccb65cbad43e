"""Weighted random: each eligible backend with probability proportional to weight."""

from __future__ import annotations

import bisect
import itertools
import random as _random
from collections.abc import Sequence

from .._backend import Backend
from .._request import RequestInfo
from .base import Algorithm, MembershipCache


class WeightedRandom(Algorithm):
    """A binary search over cumulative weights, rebuilt when membership changes."""

    name = "weighted_random"

    def __init__(self, *, rng: _random.Random | None = None) -> None:
        self._rng = rng or _random.Random()
        self._cache: MembershipCache[list[float]] = MembershipCache(
            lambda backends: list(itertools.accumulate(b.effective_weight for b in backends))
        )

    def prepare(self, backends: Sequence[Backend]) -> None:
        self._cache.get(backends)

    def pick(self, backends: Sequence[Backend], request: RequestInfo) -> Backend:
        cumulative = self._cache.get(backends)
        point = self._rng.random() * cumulative[-1]
        return backends[bisect.bisect_right(cumulative, point)]
