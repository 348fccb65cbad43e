"""No active checks: every backend counts as healthy."""

from __future__ import annotations

from .._backend import Backend


class NoHealthCheck:
    """Never probes; the pool relies on passive outlier detection, if any."""

    name = "none"

    async def check(self, backend: Backend) -> bool:
        return True

    async def aclose(self) -> None:
        return None
