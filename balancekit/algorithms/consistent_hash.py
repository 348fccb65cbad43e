"""Consistent hashing on a ring (ketama), with optional bounded loads.

Each backend owns ``points_per_weight`` x weight points on a 64-bit ring
(NGINX's ``hash ... consistent`` uses 160 per weight unit); a key goes to
the owner of the first point at or after its hash. Removing one of N
backends remaps only the keys it owned, about 1/N of them.

``bounded_load`` (e.g. 1.25) applies Google's consistent hashing with
bounded loads (Mirrokni et al., 2018; Envoy's ``hash_balance_factor``): a
backend already carrying more than that factor times the average in-flight
load is skipped, and the key walks on along the ring.

A request without the key is spread in turn over the backends, rather than
hashing an empty key onto one of them.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Sequence

from .._backend import Backend
from .._request import RequestInfo
from ._keys import key_function, stable_hash
from .base import Algorithm, MembershipCache
from .round_robin import RoundRobin

POINTS_PER_WEIGHT = 160


def build_ring(backends: Sequence[Backend], points_per_weight: int) -> tuple[list[int], list[int]]:
    """Sorted point hashes, and for each the index of the backend owning it."""
    points: list[tuple[int, int]] = []
    for index, backend in enumerate(backends):
        wanted = points_per_weight * backend.weight
        for block in range((wanted + 7) // 8):
            digest = hashlib.blake2b(f"{backend.url}#{block}".encode(), digest_size=64).digest()
            for i in range(min(8, wanted - block * 8)):
                points.append((int.from_bytes(digest[i * 8 : i * 8 + 8], "big"), index))
    points.sort()
    return [p for p, _ in points], [i for _, i in points]


class ConsistentHash(Algorithm):
    name = "consistent_hash"

    def __init__(
        self,
        *,
        key: str = "ip",
        bounded_load: float | None = None,
        points_per_weight: int = POINTS_PER_WEIGHT,
    ) -> None:
        self._key = key_function(key)
        if bounded_load is not None and not bounded_load >= 1:
            raise ValueError(f"bounded_load: must be a number >= 1, got {bounded_load!r}")
        if points_per_weight < 1:
            raise ValueError(
                f"points_per_weight: must be a positive integer, got {points_per_weight!r}"
            )
        self.bounded_load = bounded_load
        self._ring: MembershipCache[tuple[list[int], list[int]]] = MembershipCache(
            lambda backends: build_ring(backends, points_per_weight)
        )
        self._fallback = RoundRobin()  # for requests without the key

    def pick(self, backends: Sequence[Backend], request: RequestInfo) -> Backend:
        value = self._key(request)
        if value is None:
            return self._fallback.pick(backends, request)
        hashes, owners = self._ring.get(backends)
        at = bisect.bisect_left(hashes, stable_hash(value))
        if at == len(hashes):
            at = 0
        if self.bounded_load is None:
            return backends[owners[at]]
        return self._bounded(backends, owners, at)

    def _bounded(self, backends: Sequence[Backend], owners: list[int], at: int) -> Backend:
        total = sum(b.active_requests for b in backends)
        cap = self.bounded_load * (total + 1) / len(backends)  # type: ignore[operator]
        seen: set[int] = set()
        for step in range(len(owners)):
            index = owners[(at + step) % len(owners)]
            if index in seen:
                continue
            if backends[index].active_requests + 1 <= cap:
                return backends[index]
            seen.add(index)
            if len(seen) == len(backends):
                break
        return backends[owners[at]]
