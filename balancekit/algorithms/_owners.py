"""The backends a hash table was built over, and which of them may be picked now.

``consistent_hash`` and ``maglev`` build their table (ring, lookup table)
over every backend they have seen, and skip an owner that is not eligible
at lookup time, walking on to the next entry, as NGINX's consistent hash
skips a peer that is down. A health flap, a drain or an ejection then costs
no rebuild, and moves only the keys of the backend concerned. The table is
rebuilt (or extended) when a backend appears, is removed from the pool or
changes weight.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .._backend import Backend
from .base import MembershipCache

#: Owner numbers fit in this many bits (the ring packs them into its points).
OWNER_BITS = 20
OWNER_MASK = (1 << OWNER_BITS) - 1


class Owners:
    """Numbered owners of a table, with the eligible subset by number.

    ``rebuild(owners)`` makes the table anew for ``owners`` (numbered by
    position); ``extend(new)``, when given, adds owners numbered after the
    existing ones without a full rebuild.
    """

    def __init__(
        self,
        rebuild: Callable[[list[Backend]], None],
        extend: Callable[[list[Backend]], None] | None = None,
    ) -> None:
        self._rebuild = rebuild
        self._extend = extend
        self.ids: dict[Backend, int] = {}
        self.owners: list[Backend] = []
        self._weights: list[int] = []  # each owner's weight when the table was made
        self._eligible: MembershipCache[dict[int, Backend]] = MembershipCache(self._by_id)

    def eligible(self, backends: Sequence[Backend]) -> dict[int, Backend]:
        """``backends`` by owner number, the table made or grown to hold them all."""
        return self._eligible.get(backends)

    def _by_id(self, backends: Sequence[Backend]) -> dict[int, Backend]:
        weights = self._weights
        current = [
            b for b, w in zip(self.owners, weights, strict=True) if b.weight == w and not b.removed
        ]
        new = [b for b in backends if b not in self.ids or b.weight != weights[self.ids[b]]]
        if len(current) < len(self.owners) or (new and self._extend is None):
            self._number(current + [b for b in new if b not in current])
            self._rebuild(self.owners)
            # Tables made for the old numbering (the other eligible set) must go.
            self._eligible = MembershipCache(self._by_id)
        elif new:
            if len(self.owners) + len(new) > OWNER_MASK:
                self._number(current + new)
                self._rebuild(self.owners)
                self._eligible = MembershipCache(self._by_id)
            else:
                self._number(new, start=len(self.owners))
                assert self._extend is not None
                self._extend(new)
        ids = self.ids
        return {ids[b]: b for b in backends}

    def _number(self, backends: list[Backend], start: int = 0) -> None:
        if start == 0:
            self.ids, self.owners, self._weights = {}, [], []
        for backend in backends:
            self.ids[backend] = len(self.owners)
            self.owners.append(backend)
            self._weights.append(backend.weight)
