"""Runs a pool's discovery: resolve every interval, apply the difference.

One task per pool, in the loop that runs the health checks. Each round
calls the plugin's ``resolve()`` and brings the pool's discovered backends
to the answer: one that appears is added as a runtime ``add_backend`` is
(unhealthy until its first passing check when active checks run), one that
disappears is drained and removed once its requests in flight are done (or
after ``DRAIN_LIMIT``: a removed backend's requests still finish), and a
weight or backup change is made in place, so the live state of a backend
that stays (counters, ejections, health) survives. Backends of the
configuration and those added at run time are never touched, even when an
answer names them too.

A round that raises keeps the last good set: logged once per outage,
counted in ``balancekit_discovery_errors_total`` and retried after a
back-off that doubles from ``BACKOFF_START`` up to the interval.

With a shared store, the runners of every process take turns under a lease
(as health checks do, see balancekit._coordination): the holder resolves
and writes its answer to the store, the others adopt that answer, so N
processes make one resolution per interval between them, not N.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .._changes import Change, Op
from .._config import BackendConfig, validate
from .._coordination import raise_if_cancelled
from .._exceptions import ConfigError

if TYPE_CHECKING:
    from .._coordination import Coordinator
    from .._pool import Pool
    from .._types import SupportsResolve

logger = logging.getLogger("balancekit")

#: Never resolve more often than this, whatever the interval or the TTL.
MIN_INTERVAL = 1.0
#: The interval of a plugin that names none.
DEFAULT_INTERVAL = 30.0
#: The first retry after a failed round; it doubles up to the interval.
BACKOFF_START = 1.0
#: How often a backend that left is looked at until its requests are done.
REAP_STEP = 0.25
#: A backend that left is removed after this long even if busy (sessions
#: pinned to it keep a draining backend busy); its requests still finish.
DRAIN_LIMIT = 30.0
#: With a shared store: how often the processes without the lease look
#: for a newer shared answer (and for a lease that lapsed).
SHARED_POLL = 1.0
#: Seconds ``stop`` waits for the round in progress to end.
STOP_TIMEOUT = 2.0


class DiscoveryStatus:
    """What status.json says of a pool's discovery."""

    def __init__(self, type_name: str) -> None:
        self.type = type_name
        #: Wall-clock time of the last good answer (or the adopted one).
        self.last_ok: float | None = None
        #: The last failure's message, kept after a recovery; ``failing``
        #: says whether the outage goes on.
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.failing = False
        #: The URLs of the last good answer.
        self.backends: tuple[str, ...] = ()

    def as_status(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "last_ok": None if self.last_ok is None else round(self.last_ok, 3),
            "last_error": self.last_error,
            "last_error_at": None if self.last_error_at is None else round(self.last_error_at, 3),
            "failing": self.failing,
            "backends": list(self.backends),
        }


def parse_answer(answer: Any) -> tuple[dict[str, BackendConfig], list[str]]:
    """The valid backends of an answer by URL (the first of a repeated
    URL), and a line for each entry left out.

    An answer that is not a list at all is a :class:`TypeError` (the round
    fails); a bad entry in a list is only left out.
    """
    if not isinstance(answer, list | tuple):
        raise TypeError(f"resolve() must return a list of backends, got {answer!r}")
    wanted: dict[str, BackendConfig] = {}
    bad: list[str] = []
    for index, entry in enumerate(answer):
        data = {"url": entry} if isinstance(entry, str) else entry
        if not isinstance(data, Mapping):
            bad.append(f"[{index}] {entry!r}: must be a URL or a table with 'url'")
            continue
        try:
            backend = validate(BackendConfig, data)
        except ConfigError as exc:
            bad.append(f"[{index}] {entry!r}: {'; '.join(str(p) for p in exc.problems)}")
            continue
        if backend.url in wanted:
            bad.append(f"[{index}] {entry!r}: lists {backend.url!r} again")
            continue
        wanted[backend.url] = backend
    return wanted, bad


class DiscoveryRunner:
    """The task that keeps one pool's discovered backends up to date."""

    def __init__(
        self,
        pool: Pool,
        plugin: SupportsResolve,
        *,
        type_name: str,
        interval: float,
        coordinator: Coordinator | None = None,
    ) -> None:
        self.pool = pool
        self.plugin = plugin
        self.type_name = type_name
        self.interval = max(MIN_INTERVAL, interval)
        self.coordinator = coordinator
        status = pool.discovery
        if status is None:
            status = pool.discovery = DiscoveryStatus(type_name)
        self.status = status
        target = getattr(plugin, "target", None)
        self.label = f"{type_name} {target}" if target else type_name
        #: Backends that left the answer, by URL: since when (monotonic).
        self._leaving: dict[str, float] = {}
        self._backoff = 0.0
        self._bad: list[str] = []
        self._delay = self.interval
        self._adopted_at = 0.0
        #: This runner's lease token: several balancers may share a process.
        self._token = uuid.uuid4().hex
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            # Bounded: a plugin that swallows its cancellation must not
            # hang the server's shutdown.
            await asyncio.wait([task], timeout=STOP_TIMEOUT)
        aclose = getattr(self.plugin, "aclose", None)
        if aclose is not None:
            await aclose()

    async def _run(self) -> None:
        while True:
            delay = await self.round()
            raise_if_cancelled()  # a store call may have swallowed a stop
            await self._wait(delay)

    async def _wait(self, delay: float) -> None:
        # Sleep until the next round, looking at the backends that left in
        # small steps meanwhile so that each goes once its requests are done.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + delay
        while self._leaving:
            self._reap()
            left = deadline - loop.time()
            if left <= 0:
                return
            await asyncio.sleep(min(REAP_STEP, left))
        left = deadline - loop.time()
        if left > 0:
            await asyncio.sleep(left)

    # --- one round ------------------------------------------------------------------

    async def round(self) -> float:
        """Resolve (or adopt the shared answer) once and apply it; the
        seconds until the next round."""
        coordinator = self.coordinator
        mine: bool | None = None
        if coordinator is not None:
            seconds = self._delay
            mine = await coordinator.discovery_lease(self.pool, self._token, seconds)
            if mine is False:
                await self._adopt(coordinator)
                return min(SHARED_POLL, self.interval)
        wanted = await self._resolve()
        if wanted is None:
            self._backoff = min(self.interval, max(BACKOFF_START, self._backoff * 2))
            if coordinator is not None and mine:  # let whoever asks next try too
                await coordinator.share_discovery(self.pool, None, self._backoff)
            return self._backoff
        self._backoff = 0.0
        ttl = getattr(self.plugin, "ttl", None)
        delay = self.interval
        if isinstance(ttl, int | float) and not isinstance(ttl, bool) and ttl < delay:
            delay = max(MIN_INTERVAL, float(ttl))
        self._delay = delay
        if coordinator is not None and mine:
            await coordinator.share_discovery(self.pool, _shared(wanted), delay)
        return delay

    async def _resolve(self) -> dict[str, BackendConfig] | None:
        try:
            wanted, bad = parse_answer(await self.plugin.resolve())
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a plugin's failure, or its bug: keep the last good set
            self._failed(exc)
            return None
        self._left_out(bad)
        self._worked(time.time())
        self.apply(wanted)
        return wanted

    async def _adopt(self, coordinator: Coordinator) -> None:
        shared = await coordinator.shared_discovery(self.pool)
        if shared is None:
            return
        at, answer = shared
        if at <= self._adopted_at:
            return
        self._adopted_at = at
        wanted, _ = parse_answer(answer)
        self._worked(at)
        self.apply(wanted)

    def _failed(self, exc: BaseException) -> None:
        message = str(exc) or type(exc).__name__
        status = self.status
        status.last_error, status.last_error_at = message, time.time()
        if self.pool.metrics is not None:
            self.pool.metrics.discovery_failed()
        if status.failing:
            return  # once per outage
        status.failing = True
        target = getattr(self.plugin, "target", None)
        # The message of a built-in names its file or DNS name already.
        label = self.type_name if target and message.startswith(str(target)) else self.label
        logger.warning(
            "pool %s: discovery %s failed: %s; keeping the last good set (%d backends), retrying",
            self.pool.name,
            label,
            message,
            len(status.backends),
        )

    def _worked(self, at: float) -> None:
        status = self.status
        if status.failing:
            status.failing = False
            logger.info("pool %s: discovery %s answers again", self.pool.name, self.label)
        status.last_ok = at

    def _left_out(self, bad: list[str]) -> None:
        # Said when the set of bad entries changes, not every round.
        if bad and bad != self._bad:
            for line in bad:
                logger.warning(
                    "pool %s: discovery %s: entry %s: left out", self.pool.name, self.label, line
                )
        self._bad = bad

    # --- applying an answer -----------------------------------------------------------

    def apply(self, wanted: Mapping[str, BackendConfig]) -> None:
        """Bring the pool's discovered backends to ``wanted``."""
        pool = self.pool
        for url, entry in wanted.items():
            backend = pool.find(url)
            if backend is None:
                pool.add_discovered(url, entry.weight, backup=entry.backup)
                continue
            if backend.source != "discovery":
                continue  # the configuration's and the operator's stay theirs
            if self._leaving.pop(url, None) is not None and backend.draining and backend.enabled:
                pool.apply(Change(Op.ENABLE, url))  # back before it was gone
            if backend.weight != entry.weight:
                pool.apply(Change(Op.WEIGHT, url, weight=entry.weight))
            if backend.backup != entry.backup:
                pool.set_backup(url, entry.backup)
        now = time.monotonic()
        for backend in list(pool.backends):
            url = backend.url
            if backend.source == "discovery" and url not in wanted and url not in self._leaving:
                self._leaving[url] = now
                pool.apply(Change(Op.DRAIN, url))
        self.status.backends = tuple(wanted)
        self._reap()

    def _reap(self) -> None:
        pool = self.pool
        now = time.monotonic()
        for url, since in list(self._leaving.items()):
            backend = pool.find(url)
            if backend is None or backend.source != "discovery":
                del self._leaving[url]
            elif backend.active_requests == 0 or now - since >= DRAIN_LIMIT:
                del self._leaving[url]
                pool.apply(Change(Op.REMOVE, url))


def _shared(wanted: Mapping[str, BackendConfig]) -> list[dict[str, Any]]:
    return [{"url": b.url, "weight": b.weight, "backup": b.backup} for b in wanted.values()]
