"""Smooth weighted round robin, the sequence NGINX produces.

Each pick adds every eligible backend's weight to its running score, takes
the backend with the highest score and subtracts the total weight from it
(NGINX ``ngx_http_upstream_get_peer``). Weights a=5, b=1, c=1 give
``a a b a c a a`` and repeat: the heavy backend's turns are spread out
instead of bunched.
"""

from __future__ import annotations

from collections.abc import Sequence

from .._backend import Backend
from .._request import RequestInfo
from .base import Algorithm


class WeightedRoundRobin(Algorithm):
    name = "weighted_round_robin"

    def __init__(self) -> None:
        # Keyed by URL: the eligible set may change between calls, and a
        # backend keeps its score while it stays in the pool.
        self._current: dict[str, int] = {}

    def pick(self, backends: Sequence[Backend], request: RequestInfo) -> Backend:
        current = self._current
        total = 0
        best = backends[0]
        best_score = None
        for backend in backends:
            score = current.get(backend.url, 0) + backend.weight
            current[backend.url] = score
            total += backend.weight
            if best_score is None or score > best_score:
                best, best_score = backend, score
        current[best.url] -= total
        if len(current) > 2 * len(backends) + 16:
            # Forget backends that left, so the map cannot grow without bound.
            keep = {b.url for b in backends}
            self._current = {url: s for url, s in current.items() if url in keep}
        return best
