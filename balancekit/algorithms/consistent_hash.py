"""Consistent hashing on a ring (ketama), with optional bounded loads.

Each backend owns ``points_per_weight`` x weight points on a ring
(NGINX's ``hash ... consistent`` uses 160 per weight unit); a key goes to
the owner of the first point at or after its hash. Removing one of N
backends remaps only the keys it owned, about 1/N of them.

As NGINX does, a backend that is not eligible (unhealthy, draining,
ejected) keeps its points, and a key walks on past them to the next
eligible owner: the same keys move as if its points were gone, and a
health flap costs no rebuild. The ring grows by a merge when a backend
appears and is rebuilt only when a backend was removed from the pool for
good or changed weight. With a fraction f of the owners eligible, a walk
passes about 1/f points (panic mode keeps f above its threshold). A point
is 44 bits of hash and 20 bits of owner number in one int, and each
backend's points are hashed once and kept.

``bounded_load`` (e.g. 1.25) applies Google's consistent hashing with
bounded loads (Mirrokni et al., 2018; Envoy's ``hash_balance_factor``): a
backend already carrying ceil(factor x mean in-flight load) is skipped,
and the key walks on along the ring. The load is counted through the
pool's ``acquired``/``released`` feedback, not by a scan per pick.

A request without the key is spread in turn over the backends, rather than
hashing an empty key onto one of them.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from collections.abc import Sequence

from .._backend import Backend
from .._request import RequestInfo
from ._keys import key_function, stable_hash
from ._owners import OWNER_BITS, OWNER_MASK, Owners
from .base import Algorithm
from .round_robin import RoundRobin

POINTS_PER_WEIGHT = 160


def backend_points(backend: Backend, points_per_weight: int) -> list[int]:
    """The 64-bit hashes of ``backend``'s points, the same in every process."""
    wanted = points_per_weight * backend.weight
    points = []
    for block in range((wanted + 7) // 8):
        digest = hashlib.blake2b(f"{backend.url}#{block}".encode(), digest_size=64).digest()
        for i in range(min(8, wanted - block * 8)):
            points.append(int.from_bytes(digest[i * 8 : i * 8 + 8], "big"))
    return points


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
        self.points_per_weight = points_per_weight
        #: The ring: 44 bits of hash then 20 bits of owner number, sorted.
        self._ring: list[int] = []
        self._points: dict[tuple[str, int], list[int]] = {}
        self._owners = Owners(self._build, self._extend)
        self._in_flight = 0
        self._fallback = RoundRobin()  # for requests without the key

    # --- the ring, on a change -----------------------------------------------

    def _owner_points(self, backends: list[Backend], first_id: int) -> list[int]:
        points: list[int] = []
        for owner, backend in enumerate(backends, first_id):
            key = (backend.url, backend.weight)
            hashes = self._points.get(key)
            if hashes is None:
                hashes = self._points[key] = backend_points(backend, self.points_per_weight)
            points.extend((h >> OWNER_BITS) << OWNER_BITS | owner for h in hashes)
        return points

    def _build(self, owners: list[Backend]) -> None:
        keep = {(b.url, b.weight) for b in owners}
        self._points = {k: v for k, v in self._points.items() if k in keep}
        self._ring = sorted(self._owner_points(owners, 0))

    def _extend(self, new: list[Backend]) -> None:
        first_id = len(self._owners.owners) - len(new)
        # Two sorted runs: Timsort merges them in linear time.
        self._ring += sorted(self._owner_points(new, first_id))
        self._ring.sort()

    def prepare(self, backends: Sequence[Backend]) -> None:
        self._owners.eligible(backends)

    def acquired(self, backend: Backend) -> None:
        self._in_flight += 1

    def released(self, backend: Backend) -> None:
        self._in_flight = max(self._in_flight - 1, 0)

    # --- the pick ----------------------------------------------------------

    def pick(self, backends: Sequence[Backend], request: RequestInfo) -> Backend:
        value = self._key(request)
        if value is None:
            return self._fallback.pick(backends, request)
        eligible = self._owners.eligible(backends)
        ring = self._ring
        count = len(ring)
        at = bisect.bisect_left(ring, stable_hash(value) >> OWNER_BITS << OWNER_BITS)
        for walked in range(count):
            home = eligible.get(ring[(at + walked) % count] & OWNER_MASK)
            if home is not None:
                break
        else:
            raise AssertionError("the ring holds every eligible backend")
        if self.bounded_load is None or not home.active_requests:
            return home  # unbounded, or idle: under any cap, which is at least 1
        cap = math.ceil(self.bounded_load * (self._in_flight + 1) / len(backends))
        if home.active_requests < cap:
            return home
        # Bounded loads: the home backend is full; walk on to the first
        # distinct eligible owner with room (the home one if none has).
        full = {home}
        for step in range(walked + 1, walked + count):
            backend = eligible.get(ring[(at + step) % count] & OWNER_MASK)
            if backend is None or backend in full:
                continue
            if backend.active_requests < cap:
                return backend
            full.add(backend)
            if len(full) == len(eligible):
                break
        return home
