"""Runs a pool's active health checks: one task per backend.

One task per backend means checks of a backend never overlap and a slow
backend never delays the checks of the others. Each backend's first check
is offset by a random jitter of up to 10% of the interval, so the checks of
many backends do not fire together (HAProxy ``spread-checks``).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import TYPE_CHECKING, Any

from .._changes import Change, Op
from .._coordination import raise_if_cancelled

if TYPE_CHECKING:
    from .._backend import Backend
    from .._coordination import Coordinator
    from .._pool import Pool

logger = logging.getLogger("balancekit")

#: Seconds ``stop`` waits for the checks to end after cancelling them.
STOP_TIMEOUT = 2.0


class HealthScheduler:
    def __init__(
        self,
        pool: Pool,
        check: Any,
        *,
        interval: float,
        rise: int,
        fall: int,
        coordinator: Coordinator | None = None,
    ) -> None:
        self.pool = pool
        #: With a shared store: probe only when holding the backend's lease.
        self.coordinator = coordinator
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
        # Bounded: a check plugin that swallows its cancellation must not
        # hang the server's shutdown.
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=STOP_TIMEOUT)
            for task in pending:
                task.cancel()
                logger.warning("pool %s: a health check did not stop when asked", self.pool.name)
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
        coordinator = self.coordinator
        while True:
            if coordinator is not None:
                mine = await coordinator.lease(self.pool, backend, self.interval)
                if mine is not None:  # the store answered: the checks are shared
                    await self._shared_round(coordinator, backend, mine)
                    raise_if_cancelled()
                    await asyncio.sleep(self.interval)
                    continue
                raise_if_cancelled()
            ok = await self._probe(backend)
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

    async def _probe(self, backend: Backend) -> bool:
        started = time.perf_counter()
        try:
            ok = bool(await self.check.check(backend))
        except Exception as exc:  # a check plugin's bug must not stop the checks
            logger.error("health check %r failed on %s: %s", self.check.name, backend.url, exc)
            ok = False
        backend.last_check_ok, backend.last_check_at = ok, time.time()
        if self.pool.metrics is not None:
            self.pool.metrics.health_checked(backend, time.perf_counter() - started)
        return ok

    async def _shared_round(self, coordinator: Coordinator, backend: Backend, mine: bool) -> None:
        # The lease holder probes and records; everyone adopts the verdict.
        if mine:
            ok = await self._probe(backend)
            verdict = await coordinator.record(
                self.pool, backend, ok, rise=self.rise, fall=self.fall, interval=self.interval
            )
        else:
            verdict = await coordinator.verdict(self.pool, backend)
        if verdict is not None and verdict != backend.healthy:
            self.pool.set_healthy(backend, verdict)
            if mine:  # the others need not wait for their next round
                coordinator.announce(self.pool, Change(Op.HEALTH, backend.url, healthy=verdict))
