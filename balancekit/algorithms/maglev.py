"""Maglev hashing: a lookup table filled from per-backend permutations.

Eisenbud et al., "Maglev: A Fast and Reliable Software Network Load
Balancer", NSDI 2016. Each backend has an offset and a skip derived from
two hashes of its URL; backends take turns claiming their next preferred
free slot of a prime-sized table (65537 entries, as Envoy's default) until
it is full. A key's hash indexes the table: one lookup per pick, an even
spread, and little remapping when a backend leaves. Weights are honoured as
Envoy's weighted Maglev does: a backend claims a slot in a round only while
its claimed count is below round x weight / max weight.

The table is built over every backend seen (see ``_owners``): a backend
that is not eligible keeps its slots, and a key landing on one walks on to
the next slot whose owner is eligible. Only that backend's keys move, and
spread evenly since neighbouring slots belong to random owners; a health
flap costs no rebuild (about 50 ms in CPython). Adding, removing or
reweighting a backend rebuilds the table, as Maglev does.

A request without the key is spread in turn over the backends.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from .._backend import Backend
from .._request import RequestInfo
from ._keys import key_function, stable_hash
from ._owners import Owners
from .base import Algorithm
from .round_robin import RoundRobin

TABLE_SIZE = 65537


def _is_prime(n: int) -> bool:
    return n > 1 and all(n % d for d in range(2, int(n**0.5) + 1))


def build_table(backends: Sequence[Backend], size: int) -> list[int]:
    """The Maglev lookup table: for each slot, the index of a backend."""
    count = len(backends)
    offsets, skips = [], []
    for backend in backends:
        digest = hashlib.blake2b(backend.url.encode(), digest_size=16).digest()
        offsets.append(int.from_bytes(digest[:8], "big") % size)
        skips.append(int.from_bytes(digest[8:], "big") % (size - 1) + 1)
    top = max(b.weight for b in backends)
    shares = [b.weight / top for b in backends]
    table = [-1] * size
    tried = [0] * count  # how far along its permutation each backend is
    claimed = [0] * count
    filled = 0
    round_ = 0
    while filled < size:
        round_ += 1
        for i in range(count):
            if claimed[i] >= round_ * shares[i]:
                continue
            offset, skip, j = offsets[i], skips[i], tried[i]
            slot = (offset + j * skip) % size
            while table[slot] >= 0:
                j += 1
                slot = (offset + j * skip) % size
            table[slot] = i
            tried[i] = j + 1
            claimed[i] += 1
            filled += 1
            if filled == size:
                break
    return table


class Maglev(Algorithm):
    name = "maglev"

    def __init__(self, *, key: str = "ip", table_size: int = TABLE_SIZE) -> None:
        self._key = key_function(key)
        if not _is_prime(table_size):
            raise ValueError(f"table_size: must be a prime number, got {table_size!r}")
        self.table_size = table_size
        self._table: list[int] = []
        self._owners = Owners(self._build)
        self._fallback = RoundRobin()  # for requests without the key

    def _build(self, owners: list[Backend]) -> None:
        self._table = build_table(owners, self.table_size)

    def prepare(self, backends: Sequence[Backend]) -> None:
        self._owners.eligible(backends)

    def pick(self, backends: Sequence[Backend], request: RequestInfo) -> Backend:
        value = self._key(request)
        if value is None:
            return self._fallback.pick(backends, request)
        eligible = self._owners.eligible(backends)
        table, size = self._table, self.table_size
        slot = stable_hash(value) % size
        for _ in range(size):
            backend = eligible.get(table[slot])
            if backend is not None:
                return backend
            slot = slot + 1 if slot + 1 < size else 0  # not eligible: next slot
        raise AssertionError("the table holds every eligible backend")
