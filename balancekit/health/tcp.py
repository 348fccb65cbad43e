"""TCP health check: a backend is healthy when a connection opens in time."""

from __future__ import annotations

import asyncio
import contextlib

from .._backend import Backend


class TCPHealthCheck:
    """Healthy when a TCP connection to the backend opens within ``timeout``."""

    name = "tcp"

    def __init__(self, *, timeout: float = 1.0) -> None:
        self.timeout = timeout

    async def check(self, backend: Backend) -> bool:
        try:
            # asyncio.timeout: wait_for (3.11) can swallow the scheduler's
            # cancellation when the connection opens at that moment.
            async with asyncio.timeout(self.timeout):
                _, writer = await asyncio.open_connection(backend.host, backend.port)
        except (OSError, TimeoutError):
            return False
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return True

    async def aclose(self) -> None:
        return None
