"""Round robin: eligible backends in turn."""

from __future__ import annotations

from collections.abc import Sequence

from .._backend import Backend
from .._request import RequestInfo
from .base import Algorithm


class RoundRobin(Algorithm):
    """Each pick takes the next eligible backend, wrapping around.

    The position is one counter taken modulo the number of eligible
    backends, so a backend leaving or joining shifts the turn but never
    skips the pool's other members for long.
    """

    name = "round_robin"

    def __init__(self) -> None:
        self._next = 0

    def pick(self, backends: Sequence[Backend], request: RequestInfo) -> Backend:
        i = self._next % len(backends)
        self._next = i + 1
        return backends[i]
