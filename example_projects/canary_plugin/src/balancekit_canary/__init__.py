"""``header_canary``: a balancekit algorithm for canary releases.

Requests that ask for the canary (``X-Canary: 1`` by default) go to the
canary backends; a ``percent`` share of the other requests does too, so a
new release sees some real traffic before anyone opts in. Everything else
goes round robin over the stable backends. When no canary backend is
eligible (it failed its health check, say), canary requests fall back to
the stable ones rather than fail, and the other way round.

::

    [pools.api]
    backends = ["http://10.0.0.1:8000", "http://10.0.0.2:8000", "http://10.0.0.9:8000"]
    algorithm = { name = "header_canary", canaries = ["http://10.0.0.9:8000"], percent = 5 }
"""

from __future__ import annotations

from collections.abc import Sequence

from balancekit import Algorithm, Backend, RequestInfo, hookimpl

__all__ = ["HeaderCanary"]

OPT_IN = frozenset({"1", "true", "yes", "always"})


class HeaderCanary(Algorithm):
    name = "header_canary"

    def __init__(
        self, *, canaries: Sequence[str] = (), header: str = "X-Canary", percent: float = 0
    ) -> None:
        if isinstance(canaries, str) or not all(isinstance(u, str) for u in canaries):
            raise ValueError(f"canaries: must be a list of backend URLs, got {canaries!r}")
        if not canaries:
            raise ValueError("canaries: must name at least one backend URL")
        if not header or not isinstance(header, str):
            raise ValueError(f"header: must be a header name, got {header!r}")
        if not 0 <= percent <= 100:
            raise ValueError(f"percent: must be between 0 and 100, got {percent!r}")
        self.canaries = frozenset(canaries)
        self.header = header
        self.percent = percent
        self._split: tuple[Sequence[Backend], tuple[Backend, ...], tuple[Backend, ...]] | None = (
            None
        )
        self._turns = {True: 0, False: 0}  # each side takes its own turns
        self._credit = 0.0  # the canary's share, paid out evenly, not at random

    def _groups(
        self, backends: Sequence[Backend]
    ) -> tuple[tuple[Backend, ...], tuple[Backend, ...]]:
        # The split changes only when the eligible backends do.
        split = self._split
        if split is None or split[0] is not backends:
            canary = tuple(b for b in backends if b.url in self.canaries)
            stable = tuple(b for b in backends if b.url not in self.canaries)
            split = self._split = (backends, canary, stable)
        return split[1], split[2]

    def pick(self, backends: Sequence[Backend], request: RequestInfo) -> Backend:
        canary, stable = self._groups(backends)
        wants = (request.header(self.header) or "").strip().lower() in OPT_IN
        if not wants and self.percent:
            self._credit += self.percent  # in percent: exact for whole numbers
            if self._credit >= 100:
                self._credit -= 100
                wants = True
        side = wants if (canary if wants else stable) else not wants
        group = canary if side else stable
        self._turns[side] = turn = (self._turns[side] + 1) % len(group)
        return group[turn]


@hookimpl
def balancekit_register_algorithms() -> list[type[Algorithm]]:
    return [HeaderCanary]
