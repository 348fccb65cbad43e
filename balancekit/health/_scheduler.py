"""Runs a pool's active health checks: one task per backend.

One task per backend means checks of a backend never overlap and a slow
backend never delays the checks of the others. Each backend's first check
is offset by a random jitter of up to 10% of the interval, so the checks of
many backends do not fire together (HAProxy ``spread-checks``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .._backend import Backend
    from .._pool import Pool

logger = logging.getLogger("balancekit")


class HealthScheduler:
    def __init__(self, pool: Pool, check: Any, *, interval: float, rise: int, fall: int) -> None:
        self.pool = pool
        self.check = check
        self.interval = interval
        self.rise = rise
        self.fall = fall
        self._tasks: dict[Backend, asyncio.Task[None]] = {}
        self._supervisor: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._supervisor = asyncio.get_running_loop().create_task(self._supervise())

    async def stop(self) -> None:
        tasks = [*self._tasks.values()]
        if self._supervisor is not None:
            tasks.append(self._supervisor)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        await self.check.aclose()

    async def _supervise(self) -> None:
        # Follow membership: a task for each new backend, none for removed ones.
        while True:
            current = set(self.pool.backends)
            for backend in current - self._tasks.keys():
                self._tasks[backend] = asyncio.get_running_loop().create_task(self._run(backend))
            for backend in self._tasks.keys() - current:
                self._tasks.pop(backend).cancel()
            await asyncio.sleep(min(self.interval, 1.0))

    async def _run(self, backend: Backend) -> None:
        await asyncio.sleep(random.uniform(0, self.interval * 0.1))
        successes = failures = 0
        first = True
        while True:
            try:
                ok = bool(await self.check.check(backend))
            except Exception as exc:  # a check plugin's bug must not stop the checks
                logger.error("health check %r failed on %s: %s", self.check.name, backend.url, exc)
                ok = False
            if ok:
                successes, failures = successes + 1, 0
                # A backend added at runtime starts unhealthy and joins after
                # its first passing check (CONTRACT section 3).
                if not backend.healthy and (successes >= self.rise or first):
                    self.pool.set_healthy(backend, True)
            else:
                successes, failures = 0, failures + 1
                if backend.healthy and failures >= self.fall:
                    self.pool.set_healthy(backend, False)
            first = False
            await asyncio.sleep(self.interval)
