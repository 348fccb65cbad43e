"""Least connections: fewest requests in flight, relative to weight.

As NGINX ``least_conn`` and HAProxy ``leastconn``: the score is in-flight
requests divided by weight; ties go to the backends in turn (a rotating
start), never always to the first.
"""

from __future__ import annotations

from collections.abc import Sequence

from .._backend import Backend
from .._request import RequestInfo
from .base import Algorithm


class LeastConnections(Algorithm):
    name = "least_connections"

    def __init__(self) -> None:
        self._start = 0

    def pick(self, backends: Sequence[Backend], request: RequestInfo) -> Backend:
        count = len(backends)
        start = self._start % count
        self._start = start + 1
        best = backends[start]
        best_score = best.active_requests / best.weight
        for i in range(start + 1, start + count):
            backend = backends[i % count] if i >= count else backends[i]
            score = backend.active_requests / backend.weight
            if score < best_score:
                best, best_score = backend, score
        return best
