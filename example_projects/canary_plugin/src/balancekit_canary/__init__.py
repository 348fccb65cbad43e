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

import math
from collections.abc import Sequence
from urllib.parse import urlsplit

from balancekit import Algorithm, Backend, RequestInfo, hookimpl

__all__ = ["HeaderCanary"]

OPT_IN = frozenset({"1", "true", "yes", "always"})


def same_backend(url: str) -> str:
    """``url`` in the form used to compare it: scheme and host in lower case,
    no trailing slash, so ``HTTP://Host:8000/`` names ``http://host:8000``."""
    parts = urlsplit(url.strip())
    return f"{parts.scheme.lower()}://{parts.netloc.lower()}{parts.path.rstrip('/')}"


def check_canary(url: object) -> str:
    if not isinstance(url, str):
        raise ValueError(f"canaries: must be a list of backend URLs, got {url!r} in it")
    parts = urlsplit(url.strip())
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ValueError(f"canaries: {url!r} is not a backend URL like 'http://10.0.0.9:8000'")
    return same_backend(url)


class HeaderCanary(Algorithm):
    name = "header_canary"

    def __init__(
        self, *, canaries: Sequence[str] = (), header: str = "X-Canary", percent: float = 0
    ) -> None:
        if isinstance(canaries, str) or not isinstance(canaries, Sequence):
            raise ValueError(f"canaries: must be a list of backend URLs, got {canaries!r}")
        if not canaries:
            raise ValueError("canaries: must name at least one backend URL")
        if not header or not isinstance(header, str):
            raise ValueError(f"header: must be a header name, got {header!r}")
        value: object = percent  # a configuration file can hold anything
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not (math.isfinite(value) and 0 <= value <= 100)
        ):
            raise ValueError(f"percent: must be a number between 0 and 100, got {percent!r}")
        # Compared as written in the pool's backends, give or take a slash.
        self.canaries = frozenset(check_canary(url) for url in canaries)
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
            canary: list[Backend] = []
            stable: list[Backend] = []
            for backend in backends:
                (canary if same_backend(backend.url) in self.canaries else stable).append(backend)
            split = self._split = (backends, tuple(canary), tuple(stable))
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
