"""Smooth weighted round robin, the sequence NGINX produces, in O(G log N).

NGINX's rule (``ngx_http_upstream_get_peer``): each pick adds every
eligible backend's weight (its effective weight, lower while it ramps up
under ``slow_start``) to its running score, takes the backend with the
highest score (the first in order on a tie) and subtracts the total weight
from it. Weights a=5, b=1, c=1 give ``a a b a c a a`` and repeat: the heavy
backend's turns are spread out instead of bunched.

Done literally that is a scan of every backend per pick. Here the scores
are kept lazily: after ``t`` picks a backend's score is ``base + t x
weight``, and only the picked backend's ``base`` changes (by minus the
total). Backends of equal weight keep their order relative to each other
as ``t`` grows, so each weight has a heap ordered by ``base`` (then by
position, NGINX's tie rule), and a pick compares the tops of the G heaps,
one per distinct weight: O(G + log N) per pick, G being small in practice
(O(N) only when every backend has a weight of its own). The picks are
exactly NGINX's.

The heaps are rebuilt when the eligible backends change, carrying every
backend's score over. A call with another sequence than the pool's current
eligible tuple (a retry excluding the backend that failed, backends at
``max_connections`` filtered out) takes the literal scan on that subset.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

from .._backend import Backend
from .._request import RequestInfo
from .base import Algorithm


class _Schedule:
    """The lazy scores of one eligible tuple; see the module docstring."""

    def __init__(self, backends: Sequence[Backend], scores: dict[str, float]) -> None:
        self.backends = backends
        self.total = sum(b.effective_weight for b in backends)
        self.steps = 0
        by_weight: dict[float, list[tuple[float, int]]] = {}
        for index, backend in enumerate(backends):
            # heapq is a min-heap: the highest base first, then the lowest index.
            entry = (-scores.get(backend.url, 0), index)
            by_weight.setdefault(backend.effective_weight, []).append(entry)
        self.heaps = list(by_weight.items())
        for _, heap in self.heaps:
            heapq.heapify(heap)

    def pick(self) -> Backend:
        self.steps = steps = self.steps + 1
        best_heap: list[tuple[float, int]] = []
        best_score: float = 0
        best_index = 0
        for weight, heap in self.heaps:
            negated_base, index = heap[0]
            score = steps * weight - negated_base
            if not best_heap or score > best_score or (score == best_score and index < best_index):
                best_heap, best_score, best_index = heap, score, index
        negated_base = best_heap[0][0]
        heapq.heapreplace(best_heap, (negated_base + self.total, best_index))
        return self.backends[best_index]

    def scores(self) -> dict[str, float]:
        """Every backend's current running score, by URL."""
        backends, steps = self.backends, self.steps
        return {
            backends[index].url: steps * weight - negated_base
            for weight, heap in self.heaps
            for negated_base, index in heap
        }


class WeightedRoundRobin(Algorithm):
    name = "weighted_round_robin"

    def __init__(self) -> None:
        # Scores by URL while no schedule holds them: a backend keeps its
        # score when the eligible set changes around it.
        self._scores: dict[str, float] = {}
        self._schedule: _Schedule | None = None

    def prepare(self, backends: Sequence[Backend]) -> None:
        self._schedule_for(backends)

    def pick(self, backends: Sequence[Backend], request: RequestInfo) -> Backend:
        schedule = self._schedule
        if schedule is None or schedule.backends is not backends:
            if not isinstance(backends, tuple):
                return self._scan(backends)
            schedule = self._schedule_for(backends)
        return schedule.pick()

    def _schedule_for(self, backends: Sequence[Backend]) -> _Schedule:
        schedule = self._schedule
        if schedule is not None:
            if schedule.backends is backends:
                return schedule
            self._scores.update(schedule.scores())
        keep = {b.url for b in backends}
        if len(self._scores) > 2 * len(keep) + 16:
            # Forget backends that left, so the map cannot grow without bound.
            self._scores = {url: s for url, s in self._scores.items() if url in keep}
        self._schedule = schedule = _Schedule(backends, self._scores)
        return schedule

    def _scan(self, backends: Sequence[Backend]) -> Backend:
        # NGINX's loop as written, for a one-off subset of the eligible set.
        if self._schedule is not None:
            self._scores.update(self._schedule.scores())
            self._schedule = None
        scores = self._scores
        total: float = 0
        best = backends[0]
        best_score = None
        for backend in backends:
            score = scores.get(backend.url, 0) + backend.effective_weight
            scores[backend.url] = score
            total += backend.effective_weight
            if best_score is None or score > best_score:
                best, best_score = backend, score
        scores[best.url] -= total
        return best
