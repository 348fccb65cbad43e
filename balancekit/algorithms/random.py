"""Random: a uniform choice among the eligible backends."""

from __future__ import annotations

import random as _random
from collections.abc import Sequence

from .._backend import Backend
from .._request import RequestInfo
from .base import Algorithm


class Random(Algorithm):
    """Each eligible backend with the same probability (weights ignored)."""

    name = "random"

    def __init__(self, *, rng: _random.Random | None = None) -> None:
        self._rng = rng or _random.Random()

    def pick(self, backends: Sequence[Backend], request: RequestInfo) -> Backend:
        return backends[int(self._rng.random() * len(backends))]
