"""Many workers as one balancer, over a shared ``redis://`` store.

Every process that shares the store runs a :class:`Coordinator` in the loop
that runs its health checks (an ASGI server's, or the WSGI background
thread's). It keeps three things in step:

- **Runtime changes** (add, remove, drain, disable, enable, weight) made
  through one process's API are published on a channel and applied by every
  other process at once; each backend's resulting state is also written to
  a hash per pool, which every process re-reads every ``RECONCILE_INTERVAL``
  seconds, so a process that missed a message (or started later) heals.
- **Active health checks**: before probing a backend, a process takes a
  lease on it for a little under one interval; only the holder probes and
  records the result (with the rise/fall counters) in the store, and the
  others adopt the shared verdict. About one probe per backend per interval
  across all processes; when the holder dies its lease lapses and another
  takes over.
- **Discovery**: each round, the process holding a pool's discovery lease
  resolves and writes its answer to the store; the others read it and
  apply it, so N processes make one DNS query (or file read) per interval.
- **Outlier ejections**: consecutive failures are counted in the store
  across processes (a success anywhere ends the streak), so N processes do
  not need N times ``consecutive_failures``; the process that ejects tells
  the others, which eject the backend for the time that is left.

Per-request counters (in-flight requests, latency averages) stay local to
each process. When Redis cannot be reached every process goes on alone:
local checks, local changes, and catches up with the next reconcile.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from typing import TYPE_CHECKING, Any

from ._changes import ADMIN_OPS, COUNTING_OPS, Change, Op, toward_flags

if TYPE_CHECKING:
    from ._backend import Backend
    from ._balancer import Balancer
    from ._pool import Pool
    from .stores.redis import RedisStore

logger = logging.getLogger("balancekit")


def raise_if_cancelled() -> None:
    """Raise the cancellation a store call may have swallowed.

    redis-py's asyncio client can catch a CancelledError that lands inside
    a command and carry on (redis/redis-py#2028, #2551): the task stays
    marked as cancelling, but its next ``await`` no longer raises, so a
    loop that was told to stop runs one more round, and another. Loops
    that call the store check here after each round.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


CHANNEL = "balancekit:changes"
#: Seconds between full re-reads of the shared runtime state.
RECONCILE_INTERVAL = 2.0
#: A lease lasts this share of the check interval, so the next round's
#: first asker gets it.
LEASE_SHARE = 0.9
#: Seconds to wait before subscribing again after the channel failed.
RESUBSCRIBE_DELAY = 1.0
#: Seconds a shutdown waits for the coordination tasks and connections.
STOP_TIMEOUT = 2.0

#: A failure streak nobody added to for this long is forgotten.
FAILURE_MEMORY_MS = 60_000


async def _close_quietly(pubsub: Any) -> None:
    with contextlib.suppress(Exception):
        await asyncio.wait_for(pubsub.aclose(), STOP_TIMEOUT)


def _admin_key(pool: str) -> str:
    return f"balancekit:admin:{pool}"


def _health_key(pool: str, url: str) -> str:
    return f"balancekit:health:{pool}:{url}"


def admin_state(pool: Pool, url: str) -> dict[str, Any]:
    """What the shared hash keeps of one backend: enough to rebuild it."""
    backend = pool.find(url)
    if backend is None:
        return {"exists": False}
    return {
        "exists": True,
        "weight": backend.weight,
        "backup": backend.backup,
        "enabled": backend.enabled,
        "draining": backend.draining,
    }


def changes_towards(pool: Pool, url: str, state: dict[str, Any]) -> list[Change]:
    """The changes that bring ``url`` in ``pool`` to the shared ``state``."""
    backend = pool.find(url)
    if not state.get("exists"):
        return [] if backend is None else [Change(Op.REMOVE, url)]
    changes: list[Change] = []
    weight = int(state["weight"])
    if backend is None:
        changes.append(Change(Op.ADD, url, weight=weight, backup=bool(state["backup"])))
    elif backend.weight != weight:
        changes.append(Change(Op.WEIGHT, url, weight=weight))
    if backend is not None:
        changes += toward_flags(
            backend, enabled=bool(state["enabled"]), draining=bool(state["draining"])
        )
    elif not state["enabled"]:
        changes.append(Change(Op.DISABLE, url))
    elif state["draining"]:
        changes.append(Change(Op.DRAIN, url))
    return changes


class Coordinator:
    def __init__(self, balancer: Balancer, store: RedisStore) -> None:
        self.balancer = balancer
        self.store = store
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[tuple[str, Change]] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._pubsub: Any = None
        self._failing = False
        for pool in balancer.pools.values():
            pool.on_change = self.announce

    @property
    def id(self) -> str:
        """This process, as its messages name it (a forked child is another)."""
        return f"{socket.gethostname()}:{os.getpid()}"

    # --- publishing --------------------------------------------------------------

    def announce(self, pool: Pool, change: Change) -> None:
        """Called by a pool, from any thread, after a change of its own."""
        loop, queue = self._loop, self._queue
        if loop is not None and queue is not None and not loop.is_closed():
            loop.call_soon_threadsafe(queue.put_nowait, (pool.name, change))
            return
        if change.op in COUNTING_OPS:
            return  # before start: the local streak is still counted
        try:  # not started yet in this process: publish from this thread
            client = self.store.sync_client
            if change.op in ADMIN_OPS:
                client.hset(
                    _admin_key(pool.name), change.url, json.dumps(admin_state(pool, change.url))
                )
            client.publish(CHANNEL, self._message(pool.name, change))
        except Exception as exc:  # the store failed: see _trouble
            self._trouble("could not share a change", exc)

    def _message(self, pool: str, change: Change) -> str:
        return json.dumps({**change.to_json(), "pool": pool, "from": self.id})

    async def _publisher(self) -> None:
        assert self._queue is not None
        while True:
            name, change = await self._queue.get()
            pool = self.balancer.pools[name]
            client = self.store.async_client()
            try:
                if change.op in COUNTING_OPS:
                    await self._count(client, pool, change)
                    continue
                if change.op in ADMIN_OPS:
                    state = admin_state(pool, change.url)
                    await client.hset(_admin_key(name), change.url, json.dumps(state))
                await client.publish(CHANNEL, self._message(name, change))
                self._recovered()
            except Exception as exc:  # the store failed: see _trouble
                self._trouble("could not share a change", exc)

    async def _count(self, client: Any, pool: Pool, change: Change) -> None:
        # Consecutive failures of a backend, as all processes together saw
        # them: the pool that brings the count to its limit ejects (and its
        # "eject" goes out to the others); a success ends the streak.
        key = f"balancekit:failures:{pool.name}:{change.url}"
        if change.op is Op.RECOVERED:
            await client.delete(key)
            return
        count = int(await client.incr(key))
        await client.pexpire(key, FAILURE_MEMORY_MS)
        outlier = pool.outlier
        if outlier is not None and count >= outlier.consecutive_failures:
            await client.delete(key)
            pool.eject_for_failures(change.url, count)

    # --- following ---------------------------------------------------------------

    async def _subscriber(self) -> None:
        while True:
            pubsub = self._pubsub = self.store.async_client().pubsub()
            try:
                await pubsub.subscribe(CHANNEL)
                async for message in pubsub.listen():
                    if message.get("type") == "message":
                        self._apply(message["data"])
            except Exception as exc:  # the store failed: see _trouble
                self._trouble("lost the change channel", exc)
                await _close_quietly(pubsub)
            await asyncio.sleep(RESUBSCRIBE_DELAY)

    def _apply(self, raw: str) -> None:
        try:
            message = json.loads(raw)
            if message.get("from") == self.id:
                return
            pool = self.balancer.pools.get(message.get("pool"))
            if pool is not None:
                pool.apply(Change.from_json(message))
        except Exception:  # a malformed message must not stop the channel
            logger.exception("balancekit: could not apply a shared change %r", raw[:200])

    async def reconcile(self) -> None:
        """Bring every pool to the shared runtime state (idempotent)."""
        client = self.store.async_client()
        for name, pool in self.balancer.pools.items():
            shared = await client.hgetall(_admin_key(name))
            for url, raw in shared.items():
                for change in changes_towards(pool, url, json.loads(raw)):
                    pool.apply(change)

    async def _reconciler(self) -> None:
        while True:
            await asyncio.sleep(RECONCILE_INTERVAL)
            try:
                await self.reconcile()
                self._recovered()
            except Exception as exc:  # the store failed: see _trouble
                self._trouble("could not read the shared state", exc)

    # --- health checks -----------------------------------------------------------

    async def lease(self, pool: Pool, backend: Backend, interval: float) -> bool | None:
        """Whether this process probes ``backend`` this round; None when the
        store cannot say (then every process checks on its own)."""
        key = f"balancekit:lease:{pool.name}:{backend.url}"
        try:
            taken = await self.store.async_client().set(
                key, self.id, nx=True, px=max(1, int(interval * LEASE_SHARE * 1000))
            )
        except Exception as exc:  # the store failed: see _trouble
            self._trouble("could not take a health-check lease", exc)
            return None
        self._recovered()
        return bool(taken)

    async def record(
        self, pool: Pool, backend: Backend, ok: bool, *, rise: int, fall: int, interval: float
    ) -> bool | None:
        """Add a probe's result to the shared counters; the shared verdict
        after it (None when the store failed)."""
        key = _health_key(pool.name, backend.url)
        client = self.store.async_client()
        try:
            shared = await client.hgetall(key)
            successes = int(shared.get("s", 0))
            failures = int(shared.get("f", 0))
            known = "healthy" in shared
            healthy = shared.get("healthy") == "1" if known else backend.healthy
            if ok:
                successes, failures = successes + 1, 0
                # a backend nobody has checked yet joins on its first pass
                if not healthy and (successes >= rise or not known):
                    healthy = True
            else:
                successes, failures = 0, failures + 1
                if healthy and failures >= fall:
                    healthy = False
            mapping = {"s": successes, "f": failures, "healthy": "1" if healthy else "0"}
            await client.hset(key, mapping=mapping)
            await client.pexpire(key, int(interval * (rise + fall + 2) * 1000))
        except Exception as exc:  # the store failed: see _trouble
            self._trouble("could not record a health check", exc)
            return None
        return healthy

    async def verdict(self, pool: Pool, backend: Backend) -> bool | None:
        """The shared health verdict on ``backend``, or None if there is none."""
        try:
            value = await self.store.async_client().hget(
                _health_key(pool.name, backend.url), "healthy"
            )
        except Exception as exc:  # the store failed: see _trouble
            self._trouble("could not read a health verdict", exc)
            return None
        return None if value is None else value == "1"

    # --- discovery ----------------------------------------------------------------

    async def discovery_lease(self, pool: Pool, token: str, seconds: float) -> bool | None:
        """Whether the runner holding ``token`` resolves ``pool`` this round
        (it keeps a lease it holds); None when the store cannot say (then
        every process resolves on its own)."""
        key = f"balancekit:discovery-lease:{pool.name}"
        px = max(1, int(seconds * LEASE_SHARE * 1000))
        client = self.store.async_client()
        try:
            if await client.set(key, token, nx=True, px=px):
                taken = True
            else:
                taken = await client.get(key) == token
                if taken:
                    await client.pexpire(key, px)
        except Exception as exc:  # the store failed: see _trouble
            self._trouble("could not take a discovery lease", exc)
            return None
        self._recovered()
        return taken

    async def share_discovery(
        self, pool: Pool, answer: list[dict[str, Any]] | None, seconds: float
    ) -> None:
        """Write the lease holder's ``answer`` for the others to adopt (None:
        the round failed, nothing to share) and hold the lease ``seconds``,
        until its next round."""
        client = self.store.async_client()
        try:
            if answer is not None:
                data = json.dumps({"at": time.time(), "backends": answer})
                await client.set(f"balancekit:discovery:{pool.name}", data)
            await client.pexpire(
                f"balancekit:discovery-lease:{pool.name}",
                max(1, int(seconds * LEASE_SHARE * 1000)),
            )
        except Exception as exc:  # the store failed: see _trouble
            self._trouble("could not share a discovery answer", exc)

    async def shared_discovery(self, pool: Pool) -> tuple[float, list[Any]] | None:
        """The last shared answer for ``pool`` and when it was found."""
        try:
            raw = await self.store.async_client().get(f"balancekit:discovery:{pool.name}")
        except Exception as exc:  # the store failed: see _trouble
            self._trouble("could not read a discovery answer", exc)
            return None
        if raw is None:
            return None
        try:
            data = json.loads(raw)
            return float(data["at"]), list(data["backends"])
        except (ValueError, KeyError, TypeError):
            logger.error(
                "balancekit: malformed discovery answer for pool %s in the store", pool.name
            )
            return None

    # --- life --------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue()
        try:
            await self.reconcile()  # join with the state the others made
        except Exception as exc:  # the store failed: see _trouble
            self._trouble("could not read the shared state", exc)
        self._tasks = [
            self._loop.create_task(self._publisher()),
            self._loop.create_task(self._subscriber()),
            self._loop.create_task(self._reconciler()),
        ]

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        if tasks:  # bounded: a stuck Redis call must not hold up a shutdown
            await asyncio.wait(tasks, timeout=STOP_TIMEOUT)
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            await _close_quietly(pubsub)
        self._loop = self._queue = None

    def _trouble(self, what: str, exc: BaseException) -> None:
        # Every store operation here is a boundary: redis-py, the socket or a
        # malformed value may fail in any way, and none of it may stop this
        # process balancing on what it knows. Said once per outage.
        if not self._failing:  # once per outage, not once per operation
            self._failing = True
            logger.error("balancekit: %s through %s: %s; going on alone", what, self.store, exc)

    def _recovered(self) -> None:
        if self._failing:
            self._failing = False
            logger.warning("balancekit: shared state reachable again")
