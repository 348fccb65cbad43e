"""First: the first eligible backend in configured order (priority, failover).

As HAProxy's ``balance first``: traffic stays on the first backend while it
is eligible, and moves to the next in line when it is not (down, drained,
full at ``max_connections``, ejected), and back when it returns.
"""

from __future__ import annotations

from collections.abc import Sequence

from .._backend import Backend
from .._request import RequestInfo
from .base import Algorithm


class First(Algorithm):
    name = "first"

    def pick(self, backends: Sequence[Backend], request: RequestInfo) -> Backend:
        return backends[0]  # the pool keeps the configured order
