"""Least connections: fewest requests in flight, relative to weight.

As NGINX ``least_conn`` and HAProxy ``leastconn``: the score is in-flight
requests divided by weight (the effective weight, lower while a backend
ramps up under ``slow_start``); ties go to the backends in turn, never always
to the first.

HAProxy keeps its servers in a tree ordered by that score and moves a
server when it takes or drops a connection (``fwlc_srv_reposition``), so a
pick never scans the farm. Here the same idea with buckets: backends of
one weight sit in buckets by in-flight count, each bucket an ordered set,
and a request taken or finished moves one backend to the next bucket, O(1).
A pick looks at the lowest non-empty bucket of each distinct weight: O(G),
G being the number of distinct weights. A backend leaving a bucket goes to
the end of its next one, which is what spreads ties in turn.

A call with another sequence than the pool's current eligible tuple (a
retry excluding the backend that failed, backends at ``max_connections``
filtered out) scans that subset instead.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from .._backend import Backend
from .._request import RequestInfo
from .base import Algorithm


class _Buckets:
    """Backends of one weight, by in-flight count."""

    __slots__ = ("buckets", "lowest", "weight")

    def __init__(self, weight: float) -> None:
        self.weight = weight
        self.buckets: dict[int, OrderedDict[Backend, None]] = {}
        self.lowest = 0

    def add(self, backend: Backend, count: int) -> None:
        bucket = self.buckets.get(count)
        if bucket is None:
            bucket = self.buckets[count] = OrderedDict()
        bucket[backend] = None
        if count < self.lowest or len(self.buckets) == 1:
            self.lowest = count

    def move(self, backend: Backend, old: int, new: int) -> None:
        bucket = self.buckets[old]
        del bucket[backend]
        if not bucket:
            del self.buckets[old]
        self.add(backend, new)  # lowers ``lowest`` if new is below it
        if old == self.lowest and old not in self.buckets:
            # Counts move by one, so the new lowest is next door.
            self.lowest = new if new == old + 1 else min(self.buckets)

    def first(self) -> Backend:
        return next(iter(self.buckets[self.lowest]))


class LeastConnections(Algorithm):
    name = "least_connections"

    def __init__(self) -> None:
        self._backends: Sequence[Backend] = ()
        self._groups: list[_Buckets] = []
        # Where each member sits: its weight's buckets and its count there.
        self._where: dict[Backend, tuple[_Buckets, int]] = {}
        self._turn = 0
        self._start = 0

    def prepare(self, backends: Sequence[Backend]) -> None:
        groups: dict[float, _Buckets] = {}
        where = {}
        for backend in backends:
            weight = backend.effective_weight
            group = groups.get(weight)
            if group is None:
                group = groups[weight] = _Buckets(weight)
            group.add(backend, backend.active_requests)
            where[backend] = (group, backend.active_requests)
        self._backends = backends
        self._groups = list(groups.values())
        self._where = where

    def acquired(self, backend: Backend) -> None:
        self._moved(backend)

    def released(self, backend: Backend) -> None:
        self._moved(backend)

    def _moved(self, backend: Backend) -> None:
        place = self._where.get(backend)
        if place is None:
            return  # not eligible now (draining, say): no bucket to move
        group, old = place
        new = backend.active_requests
        if new != old:
            group.move(backend, old, new)
            self._where[backend] = (group, new)

    def pick(self, backends: Sequence[Backend], request: RequestInfo) -> Backend:
        if backends is not self._backends:
            if not isinstance(backends, tuple):
                return self._scan(backends)
            self.prepare(backends)
        groups = self._groups
        if len(groups) == 1:
            return groups[0].first()
        # Between weights, ties go in turn too: start at a rotating group.
        self._turn = turn = (self._turn + 1) % len(groups)
        best = groups[turn]
        best_score = best.lowest / best.weight
        for group in groups:
            score = group.lowest / group.weight
            if score < best_score:
                best, best_score = group, score
        return best.first()

    def _scan(self, backends: Sequence[Backend]) -> Backend:
        count = len(backends)
        start = self._start % count
        self._start = start + 1
        best = backends[start]
        best_score = best.active_requests / best.effective_weight
        for i in range(start + 1, start + count):
            backend = backends[i % count] if i >= count else backends[i]
            score = backend.active_requests / backend.effective_weight
            if score < best_score:
                best, best_score = backend, score
        return best
