"""Pools: a set of backends, who is eligible, and the pick.

Eligibility (enabled, not draining, healthy, not ejected) changes only on
events, so the eligible lists are rebuilt then, not per request. The one
per-request condition, ``max_connections``, is filtered only while some
backend is actually at its limit.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ._backend import Backend, BackendState
from ._config import validate_backend
from ._exceptions import NoEligibleBackend
from .algorithms.base import overrides

if TYPE_CHECKING:
    from ._config import PoolConfig
    from ._request import RequestInfo
    from ._types import SupportsPick
    from .metrics import PoolMetrics
    from .persistence import Persistence

logger = logging.getLogger("balancekit")

StateListener = Callable[["Pool", Backend, BackendState, BackendState], None]

_NEVER = float("inf")

#: Retries allowed in flight whatever the budget says (Envoy's floor).
RETRY_BUDGET_FLOOR = 3
#: Slow start: a joining backend's first share of its weight, and the
#: number of steps to all of it.
RAMP_FLOOR = 0.1
RAMP_STEPS = 10


class Pool:
    """A named group of backends balanced by one algorithm.

    Safe to share between threads and tasks: every mutation and every pick
    happens under one lock, which is never held across I/O.
    """

    def __init__(
        self,
        name: str,
        config: PoolConfig,
        algorithm: SupportsPick,
        *,
        on_state_change: StateListener | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.config = config
        self.max_connections = config.max_connections
        self.timeouts = config.timeouts
        self.retries = config.retries
        self.outlier = config.outlier_detection
        self.panic_threshold = config.panic_threshold
        self.slow_start = config.slow_start
        #: True while too few backends are eligible and all of them take
        #: traffic regardless of health (Envoy's panic mode).
        self.panic = False
        #: Set by the balancer when active checks run: new backends then wait
        #: for their first passing check before they take traffic.
        self.active_checks = False
        self._clock = clock
        self._on_state_change = on_state_change
        #: Counts additions and removals: derived tables (a persistence
        #: type's token map) are rebuilt when it moves.
        self.membership = 0
        #: The pool's session persistence, or None (set by the Balancer).
        self.persistence: Persistence | None = None
        #: Prometheus metrics of this pool, when they are on (set by the Balancer).
        self.metrics: PoolMetrics | None = None
        #: Told of every runtime change made through this pool's methods,
        #: and of ejections, so that other processes can follow (set by the
        #: Balancer when its store is shared).
        self.on_change: Callable[[Pool, dict[str, Any]], None] | None = None
        self._lock = threading.RLock()
        self.backends: list[Backend] = []
        self._by_url: dict[str, Backend] = {}
        self._primary: tuple[Backend, ...] = ()
        self._backup: tuple[Backend, ...] = ()
        self._saturated = 0
        self._eligible: frozenset[Backend] = frozenset()
        self._started = False  # backends of the configuration do not ramp
        self._ramping: list[Backend] = []
        self._next_expiry = _NEVER
        self._next_ramp = _NEVER
        self._next_timer = _NEVER
        self.active_requests = 0
        self.retries_active = 0
        for backend in config.backends:
            self._add(Backend(backend.url, backend.weight, backup=backend.backup))
        self.algorithm = algorithm  # also builds the eligible lists
        self._started = True  # from now on, a backend joining ramps up

    @property
    def algorithm(self) -> SupportsPick:
        return self._algorithm

    @algorithm.setter
    def algorithm(self, algorithm: SupportsPick) -> None:
        # The optional feedback methods are looked up once, here; the base
        # class's no-ops are not called at all.
        def hook(method: str) -> Callable[..., None] | None:
            return getattr(algorithm, method) if overrides(algorithm, method) else None

        with self._lock:
            self._algorithm = algorithm
            self._prepare = hook("prepare")
            self._acquired = hook("acquired")
            self._released = hook("released")
            self._rebuild()

    # --- the request path ---------------------------------------------------

    def acquire(
        self,
        request: RequestInfo,
        *,
        exclude: Backend | None = None,
        prefer: Backend | None = None,
    ) -> Backend:
        """Pick a backend for ``request`` and count the request as in flight.

        ``exclude`` is a backend that just failed this request; it is skipped
        when another is eligible. ``prefer`` is the backend a session is
        pinned to: taken while it is eligible or only draining (and below
        ``max_connections``), else the pick goes on as if there were no pin.
        Raises :class:`NoEligibleBackend`.
        """
        if self._next_timer != _NEVER and self._next_timer <= self._clock():
            self._timers()
        with self._lock:
            if prefer is not None and self._pinnable(prefer):
                return self._take(prefer)
            candidates = self._primary or self._backup
            if self._saturated:
                limit = self.max_connections
                candidates = tuple(b for b in candidates if b.active_requests < limit)
                if not candidates:
                    backups = tuple(b for b in self._backup if b.active_requests < limit)
                    candidates = backups
            if exclude is not None and len(candidates) > 1 and exclude in candidates:
                candidates = tuple(b for b in candidates if b is not exclude)
            if not candidates:
                raise NoEligibleBackend(
                    f"no eligible backend in pool {self.name!r}", pool=self.name
                )
            return self._take(self._algorithm.pick(candidates, request))

    def _pinnable(self, backend: Backend) -> bool:
        # Under the lock. Draining keeps its sessions; nothing else unfit does.
        return (
            (backend in self._eligible or (backend.draining and backend.enabled))
            and backend.healthy
            and not backend.ejected_until
            and not backend.removed
            and backend.active_requests < self.max_connections
        )

    def _take(self, backend: Backend) -> Backend:
        # Under the lock: count a request on ``backend``.
        backend.active_requests += 1
        backend.requests_total += 1
        self.active_requests += 1
        if backend.active_requests == self.max_connections:
            self._saturated += 1
        if self._acquired is not None:
            self._acquired(backend)
        return backend

    def release(self, backend: Backend, *, ok: bool, latency_ms: float | None) -> None:
        """Finish a request on ``backend``: counters, latency, outlier detection.

        ``ok`` is False for a connection error, a timeout or a 5xx answer
        (as Envoy's ``consecutive_5xx``); ``latency_ms`` is None when there
        is no meaningful sample (the client went away).
        """
        changed = None
        streak = 0
        with self._lock:
            if backend.active_requests == self.max_connections:
                self._saturated -= 1
            backend.active_requests -= 1
            self.active_requests -= 1
            if latency_ms is not None:
                backend.record_latency(latency_ms, failed=not ok, at=self._clock())
                backend.recent_ms.append(latency_ms)
            if self._released is not None:
                self._released(backend)
            if ok:
                streak = backend.consecutive_failures
                backend.consecutive_failures = 0
            else:
                backend.failures_total += 1
                backend.consecutive_failures += 1
                changed = self._maybe_eject(backend)
        if changed is not None:
            self._ejected(backend, changed)
        elif self.on_change is not None and self.outlier is not None:
            # Shared stores count failures across processes: each one, and
            # the success that ends a streak (never a plain success).
            if not ok:
                self.on_change(self, {"op": "failure", "url": backend.url})
            elif streak:
                self.on_change(self, {"op": "recovered", "url": backend.url})

    def eject_for_failures(self, url: str, failures: int) -> None:
        """Eject ``url`` for ``failures`` consecutive failures counted across
        processes (see :mod:`balancekit._coordination`), by the pool's rules."""
        backend = self._by_url.get(url)
        if backend is None or self.outlier is None:
            return
        with self._lock:
            backend.consecutive_failures = max(backend.consecutive_failures, failures)
            changed = self._maybe_eject(backend)
        if changed is not None:
            self._ejected(backend, changed)

    def _ejected(self, backend: Backend, changed: tuple[BackendState, BackendState]) -> None:
        if self.metrics is not None:
            self.metrics.ejected(backend)
        self._notify(backend, *changed)
        if self.on_change is not None:
            seconds = backend.ejected_until - self._clock()
            self.on_change(self, {"op": "eject", "url": backend.url, "seconds": seconds})

    def try_acquire_retry(self) -> bool:
        """Take a place in the retry budget; False when it is spent."""
        with self._lock:
            budget = max(
                RETRY_BUDGET_FLOOR, self.active_requests * self.retries.budget_percent / 100
            )
            if self.retries_active >= budget:
                return False
            self.retries_active += 1
            return True

    def release_retry(self) -> None:
        with self._lock:
            self.retries_active -= 1

    # --- runtime control ------------------------------------------------------

    def add_backend(self, url: str, weight: int = 1, *, backup: bool = False) -> Backend:
        """Add a backend at runtime; it takes traffic at once (after its first
        passing check, when active checks run)."""
        validate_backend(url, weight, backup=backup)
        backend = self._add_backend(url, weight, backup)
        self._announce({"op": "add", "url": url, "weight": weight, "backup": backup})
        return backend

    def remove_backend(self, url: str) -> None:
        """Remove a backend. Requests in flight on it finish normally."""
        self._remove_backend(url)
        self._announce({"op": "remove", "url": url})

    def drain(self, url: str) -> None:
        """No new requests; those in flight (and pinned sessions) finish."""
        self._update(url, draining=True)
        self._announce({"op": "drain", "url": url})

    def disable(self, url: str) -> None:
        """No traffic at all."""
        self._update(url, enabled=False)
        self._announce({"op": "disable", "url": url})

    def enable(self, url: str) -> None:
        """Undo :meth:`drain` and :meth:`disable`."""
        self._update(url, enabled=True, draining=False)
        self._announce({"op": "enable", "url": url})

    def set_weight(self, url: str, weight: int) -> None:
        """Change a backend's weight."""
        validate_backend(url, weight)
        self._set_weight(url, weight)
        self._announce({"op": "weight", "url": url, "weight": weight})

    def apply(self, change: dict[str, Any]) -> None:
        """Apply a change another process made through the methods above
        (see :mod:`balancekit._coordination`); not announced again, and
        idempotent: a change already in place, or about a backend this pool
        does not have, is skipped."""
        op, url = change.get("op"), change.get("url")
        if not isinstance(url, str):
            return
        backend = self._by_url.get(url)
        if op == "add":
            if backend is None:
                self._add_backend(url, int(change.get("weight", 1)), bool(change.get("backup")))
            return
        if backend is None:
            return
        if op == "remove":
            self._remove_backend(url)
        elif op == "drain" and not backend.draining:
            self._update(url, draining=True)
        elif op == "disable" and backend.enabled:
            self._update(url, enabled=False)
        elif op == "enable" and (backend.draining or not backend.enabled):
            self._update(url, enabled=True, draining=False)
        elif op == "weight" and backend.weight != change.get("weight"):
            self._set_weight(url, int(change["weight"]))
        elif op == "eject":
            self._eject_for(backend, float(change.get("seconds", 0)))
        elif op == "health" and backend.healthy != bool(change.get("healthy")):
            self._update(url, healthy=bool(change.get("healthy")))

    def _announce(self, change: dict[str, Any]) -> None:
        if self.on_change is not None:
            self.on_change(self, change)

    def _add_backend(self, url: str, weight: int, backup: bool) -> Backend:
        with self._lock:
            if url in self._by_url:
                raise ValueError(f"pool {self.name!r} already has backend {url!r}")
            backend = Backend(url, weight, backup=backup)
            backend.healthy = not self.active_checks
            self._add(backend)
            self._rebuild()
        logger.info("pool %s: backend %s added", self.name, url)
        return backend

    def _remove_backend(self, url: str) -> None:
        with self._lock:
            backend = self.backend(url)
            self.backends.remove(backend)
            del self._by_url[url]
            backend.removed = True
            self.membership += 1
            self._rebuild()
        logger.info("pool %s: backend %s removed", self.name, url)

    def _set_weight(self, url: str, weight: int) -> None:
        with self._lock:
            backend = self.backend(url)
            backend.weight = weight
            if not backend.ramp_started:
                backend.effective_weight = weight
            self._rebuild()
        logger.info("pool %s: backend %s weight %d", self.name, url, weight)

    def _eject_for(self, backend: Backend, seconds: float) -> None:
        # Another process ejected it: out here too, for as long as is left.
        with self._lock:
            if seconds <= 0 or backend.removed:
                return
            until = self._clock() + seconds
            if backend.ejected_until >= until:
                return
            old = backend.state
            backend.ejected_until = until
            self._rebuild()
        logger.warning(
            "pool %s: backend %s ejected for %.0fs by another worker",
            self.name,
            backend.url,
            seconds,
        )
        if self.metrics is not None:
            self.metrics.ejected(backend)
        if old is not backend.state:
            self._notify(backend, old, backend.state)

    def set_healthy(self, backend: Backend, healthy: bool) -> None:
        """Record an active health check's verdict."""
        if backend.healthy != healthy:
            self._update(backend.url, healthy=healthy)

    def find(self, url: str) -> Backend | None:
        """The backend with ``url``, or None (no error: for lookups on a
        request's path)."""
        return self._by_url.get(url)

    def backend(self, url: str) -> Backend:
        try:
            return self._by_url[url]
        except KeyError:
            raise KeyError(f"pool {self.name!r} has no backend {url!r}") from None

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {
                "algorithm": self.algorithm.name,
                "panic": self.panic,
                "active_requests": self.active_requests,
                "retries_active": self.retries_active,
                "backends": [b.as_status() for b in self.backends],
            }

    # --- internals --------------------------------------------------------------

    def _add(self, backend: Backend) -> Backend:
        self.membership += 1
        self.backends.append(backend)
        self._by_url[backend.url] = backend
        return backend

    def _update(self, url: str, **fields: bool) -> None:
        with self._lock:
            backend = self.backend(url)
            old = backend.state
            for name, value in fields.items():
                setattr(backend, name, value)
            new = backend.state
            self._rebuild()
        if old is not new:
            self._notify(backend, old, new)

    def _rebuild(self) -> None:
        # Called under the lock after any change of membership or state.
        def eligible(b: Backend) -> bool:
            return b.enabled and not b.draining and b.healthy and not b.ejected_until

        primary = tuple(b for b in self.backends if not b.backup and eligible(b))
        backup = tuple(b for b in self.backends if b.backup and eligible(b))
        panic = False
        if self.panic_threshold and (primary or not backup):
            # Envoy's panic mode: when too few of the primaries the operator
            # left in service are eligible, the few would drown; spread over
            # all of them instead, healthy or not. Backups, when some
            # are eligible, still take over from no primary at all first.
            in_service = tuple(
                b for b in self.backends if not b.backup and b.enabled and not b.draining
            )
            if len(primary) * 100 < self.panic_threshold * len(in_service):
                primary, panic = in_service, True
        if panic != self.panic:
            self.panic = panic
            if panic:
                logger.warning(
                    "pool %s: panic mode, under %d%% of backends eligible: balancing over all %d",
                    self.name,
                    self.panic_threshold,
                    len(primary),
                )
            else:
                logger.info("pool %s: panic mode over", self.name)
        now_eligible = frozenset(b for b in self.backends if eligible(b))
        if self.slow_start and self._started:
            joined = now_eligible - self._eligible
            if joined:
                self._start_ramps(joined)
        self._eligible = now_eligible
        self._primary, self._backup = primary, backup
        self._saturated = sum(1 for b in self.backends if b.active_requests >= self.max_connections)
        expiries = [b.ejected_until for b in self.backends if b.ejected_until]
        self._next_expiry = min(expiries, default=_NEVER)
        self._next_timer = min(self._next_expiry, self._next_ramp)
        if self._prepare is not None:
            for eligible_set in (self._backup, self._primary):
                if eligible_set:
                    self._prepare(eligible_set)

    # --- slow start -------------------------------------------------------------

    def _start_ramps(self, joined: frozenset[Backend]) -> None:
        # Under the lock. A backend that (re)joins begins at a tenth of its
        # weight (Envoy's default min_weight_percent) and grows linearly to
        # all of it over ``slow_start`` seconds, in ten steps: each step is a
        # rebuild, so tables are remade ten times per ramp, not per request.
        now = self._clock()
        for backend in joined:
            backend.ramp_started = now
            backend.effective_weight = backend.weight * RAMP_FLOOR
            if backend not in self._ramping:
                self._ramping.append(backend)
        self._next_ramp = min(self._next_ramp, now + self.slow_start / RAMP_STEPS)

    def _advance_ramps(self, now: float) -> None:
        # Under the lock.
        still = []
        for backend in self._ramping:
            if backend.removed:
                continue
            share = (now - backend.ramp_started) / self.slow_start
            if share >= 1:
                backend.effective_weight = backend.weight
                backend.ramp_started = 0.0
            else:
                backend.effective_weight = backend.weight * max(RAMP_FLOOR, share)
                still.append(backend)
        self._ramping = still
        self._next_ramp = _NEVER
        if still:
            # The next step, or the end of a ramp if one ends sooner.
            ends = min(b.ramp_started for b in still) + self.slow_start
            self._next_ramp = min(now + self.slow_start / RAMP_STEPS, ends)

    def _timers(self) -> None:
        now = self._clock()
        if self._next_ramp <= now:
            with self._lock:
                self._advance_ramps(now)
                self._rebuild()
        if self._next_expiry <= now:
            self._expire_ejections()

    def _maybe_eject(self, backend: Backend) -> tuple[BackendState, BackendState] | None:
        # Under the lock. Envoy's consecutive-5xx ejection, with its doubling
        # ejection time and its cap on the share of ejected backends.
        outlier = self.outlier
        if outlier is None or backend.ejected_until or backend.removed:
            return None
        if backend.consecutive_failures < outlier.consecutive_failures:
            return None
        ejected = sum(1 for b in self.backends if b.ejected_until)
        if (ejected + 1) * 100 > outlier.max_ejection_percent * len(self.backends):
            return None
        old = backend.state
        backend.ejections += 1
        duration = min(
            outlier.base_ejection_time * 2 ** (backend.ejections - 1), outlier.max_ejection_time
        )
        backend.ejected_until = self._clock() + duration
        backend.consecutive_failures = 0
        self._rebuild()
        logger.warning(
            "pool %s: backend %s ejected for %.0fs after %d consecutive failures",
            self.name,
            backend.url,
            duration,
            outlier.consecutive_failures,
        )
        return old, backend.state

    def _expire_ejections(self) -> None:
        with self._lock:
            now = self._clock()
            back = [b for b in self.backends if b.ejected_until and b.ejected_until <= now]
            for backend in back:
                backend.ejected_until = 0.0
            self._rebuild()
        for backend in back:
            logger.info("pool %s: backend %s returns from ejection", self.name, backend.url)
            self._notify(backend, BackendState.EJECTED, backend.state)

    def _notify(self, backend: Backend, old: BackendState, new: BackendState) -> None:
        backend.state_since = time.time()
        if self.metrics is not None:
            self.metrics.state_changed(backend, new)
        if self._on_state_change is not None:
            self._on_state_change(self, backend, old, new)
