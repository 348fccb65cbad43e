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
from collections import deque
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING, Any

from . import _outlier
from ._adaptive import AdaptiveLimit
from ._backend import Backend, BackendState
from ._changes import Change, Op
from ._config import validate_backend
from ._decision import FIVE_XX
from ._exceptions import NoEligibleBackend
from ._slow_start import NEVER, SlowStart
from .algorithms.base import overrides

if TYPE_CHECKING:
    from ._config import PoolConfig
    from ._request import RequestInfo
    from ._types import SupportsPick
    from ._upstream_tls import UpstreamTLS
    from .discovery._runner import DiscoveryStatus
    from .metrics import PoolMetrics
    from .persistence import Persistence

logger = logging.getLogger("balancekit")

StateListener = Callable[["Pool", Backend, BackendState, BackendState], None]
ChangeListener = Callable[["Pool", Change], None]

#: Retries allowed in flight whatever the budget says (Envoy's floor).
RETRY_BUDGET_FLOOR = 3


class Waiter:
    """A request's place in a pool's queue (``max_pending``).

    The pool hands a backend over directly: when a place frees up, it picks
    one for the first waiter, counts it as in flight and sets ``backend``
    before calling ``notify``, so a request arriving in between cannot take
    the place (first come, first served). ``notify`` is called under the
    pool's lock, from whichever thread freed the place: it must only wake
    the waiter (set an event, or schedule a future's result on its loop).
    """

    __slots__ = ("backend", "exclude", "notify", "request")

    def __init__(
        self, request: RequestInfo, exclude: Collection[Backend], notify: Callable[[], None]
    ) -> None:
        self.request = request
        self.exclude = exclude
        self.notify = notify
        self.backend: Backend | None = None


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
        tls: UpstreamTLS | None = None,
    ) -> None:
        self.name = name
        #: The context its https:// backends are reached with (``tls``
        #: table), built by the Balancer; None: the system's defaults.
        self._tls = tls
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
        #: What its discovery last found, when it has one (set by the Balancer).
        self.discovery: DiscoveryStatus | None = None
        #: Told of every runtime change made through this pool's methods,
        #: and of ejections, so that other processes can follow (set by the
        #: Balancer when its store is shared).
        self.on_change: ChangeListener | None = None
        self._lock = threading.RLock()
        self.backends: list[Backend] = []
        self._by_url: dict[str, Backend] = {}
        self._primary: tuple[Backend, ...] = ()
        self._backup: tuple[Backend, ...] = ()
        self._saturated = 0
        self._eligible: frozenset[Backend] = frozenset()
        self._started = False  # backends of the configuration do not ramp
        self._slow_start = SlowStart(self.slow_start) if self.slow_start else None
        self._next_expiry = NEVER
        self._next_timer = NEVER
        outlier = self.outlier
        #: The statuses that count against a backend (None: every 5xx).
        self.failure_statuses: frozenset[int] = (
            FIVE_XX if outlier is None else outlier.failure_statuses
        )
        #: The interval detectors on (success rate, failure percentage).
        detectors = () if outlier is None else (outlier.success_rate, outlier.failure_percentage)
        self._intervals = tuple(_outlier.Interval(d, clock()) for d in detectors if d is not None)
        self.max_pending = config.max_pending
        self.queue_timeout = config.queue_timeout
        adaptive = config.adaptive_concurrency
        #: ``adaptive_concurrency``: the limit on requests in flight, or None.
        self.adaptive = (
            None
            if adaptive is None
            else AdaptiveLimit(adaptive.min_limit, adaptive.max_limit, adaptive.window, clock())
        )
        #: Requests waiting for a place, first come first served.
        self._waiters: deque[Waiter] = deque()
        self.active_requests = 0
        self.retries_active = 0
        #: Retries granted whose try has not begun (backing off or queued):
        #: their requests hold no backend but are still the pool's.
        self.retries_waiting = 0
        for backend in config.backends:
            self._add(Backend(backend.url, backend.weight, backup=backend.backup))
        self.algorithm = algorithm  # also builds the eligible lists
        self._started = True  # from now on, a backend joining ramps up

    @property
    def tls(self) -> UpstreamTLS | None:
        return self._tls

    @tls.setter
    def tls(self, tls: UpstreamTLS | None) -> None:
        # A reload that found the files of an unchanged table rotated: new
        # connections use the new context; those open finish on the old.
        with self._lock:
            self._tls = tls
            for backend in self.backends:
                if backend.scheme == "https":
                    backend.tls = tls

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
        exclude: Collection[Backend] = (),
        prefer: Backend | None = None,
    ) -> Backend:
        """Pick a backend for ``request`` and count the request as in flight.

        ``exclude`` holds the backends this request already tried; they are
        skipped while another is eligible. ``prefer`` is the backend a session is
        pinned to: taken while it is eligible or only draining (and below
        ``max_connections``), else the pick goes on as if there were no pin.
        Raises :class:`NoEligibleBackend`.
        """
        if self._next_timer != NEVER and self._next_timer <= self._clock():
            self._timers()
        with self._lock:
            if prefer is not None and self._pinnable(prefer):
                return self._take(prefer)
            if exclude or self._saturated or self.adaptive is not None:
                candidates = self._candidates(exclude)
            else:  # the common case, without a call
                candidates = self._primary or self._backup
            if not candidates:
                raise self._none_eligible()
            return self._take(self._algorithm.pick(candidates, request))

    def _candidates(self, exclude: Collection[Backend]) -> tuple[Backend, ...]:
        # Under the lock: who may take a request now, the backends already
        # tried left out while another is eligible.
        adaptive = self.adaptive
        if adaptive is not None and self.active_requests >= adaptive.limit:
            return ()  # at the adaptive limit: full, as at max_connections
        candidates = self._primary or self._backup
        if self._saturated:
            limit = self.max_connections
            candidates = tuple(b for b in candidates if b.active_requests < limit)
            if not candidates:
                candidates = tuple(b for b in self._backup if b.active_requests < limit)
        if exclude and len(candidates) > 1:
            fresh = tuple(b for b in candidates if b not in exclude)
            if fresh:
                candidates = fresh
        return candidates

    def _none_eligible(self) -> NoEligibleBackend:
        # Under the lock, when _candidates() is empty: "full" when backends
        # are eligible but every one is at max_connections (a request may
        # then queue), not when none is eligible at all.
        adaptive = self.adaptive
        if adaptive is not None and self.active_requests >= adaptive.limit and self._eligible:
            detail = f"pool {self.name!r} is at its adaptive concurrency limit ({adaptive.limit})"
            error = NoEligibleBackend(detail, pool=self.name)
            error.full = True
            return error
        error = NoEligibleBackend(f"no eligible backend in pool {self.name!r}", pool=self.name)
        error.full = bool(self._primary or self._backup)
        return error

    # --- the queue: max_pending, queue_timeout ------------------------------------

    def enqueue(
        self, request: RequestInfo, exclude: Collection[Backend], notify: Callable[[], None]
    ) -> Waiter:
        """A place in the queue for a request that found the pool full.

        The returned waiter may already hold a backend (one came free since
        :meth:`acquire` failed). Raises :class:`NoEligibleBackend` when the
        queue already holds ``max_pending`` requests, or when no backend is
        eligible at all any more.
        """
        with self._lock:
            waiter = Waiter(request, exclude, notify)
            candidates = () if self._waiters else self._candidates(exclude)
            if candidates:
                waiter.backend = self._take(self._algorithm.pick(candidates, request))
                return waiter
            if not (self._primary or self._backup):
                raise self._none_eligible()
            if len(self._waiters) >= self.max_pending:
                error = NoEligibleBackend(
                    f"pool {self.name!r} is full and {self.max_pending} requests already wait",
                    pool=self.name,
                )
                error.full = True
                raise error
            self._waiters.append(waiter)
            return waiter

    def leave(self, waiter: Waiter, *, keep: bool) -> Backend | None:
        """``waiter`` stops waiting: the backend it was handed meanwhile,
        if any and ``keep``; without ``keep`` (the client left) a backend
        handed over is given back to the next in line."""
        with self._lock:
            backend = waiter.backend
            if backend is None:  # still in line: served ones hold a backend
                self._waiters.remove(waiter)
                return None
            if keep:
                return backend
            waiter.backend = None
            backend.requests_total -= 1  # it never went
            self._untake(backend)
            if self._released is not None:
                self._released(backend)
            self._serve_waiters()
            return None

    @property
    def queued(self) -> int:
        """Requests waiting in the queue now."""
        return len(self._waiters)

    @property
    def eligible_backends(self) -> int:
        """How many backends may take traffic by their state now: enabled,
        not draining, healthy and not ejected, backups included (panic mode
        or not). Catches up first, as a pick does, on an ejection that has
        ended with no request since."""
        if self._next_timer != NEVER and self._next_timer <= self._clock():
            self._timers()
        return len(self._eligible)

    def _serve_waiters(self) -> None:
        # Under the lock, after a place may have come free: hand backends to
        # the first waiters while there are places.
        waiters = self._waiters
        while waiters:
            candidates = self._candidates(waiters[0].exclude)
            if not candidates:
                return
            waiter = waiters.popleft()
            waiter.backend = self._take(self._algorithm.pick(candidates, waiter.request))
            waiter.notify()

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

    def _untake(self, backend: Backend) -> None:
        # Under the lock: a request leaves ``backend`` (the counting half of
        # release(), shared with a queued request that gives its place back).
        if backend.active_requests == self.max_connections:
            self._saturated -= 1
        backend.active_requests -= 1
        self.active_requests -= 1

    def release(
        self, backend: Backend, *, ok: bool, latency_ms: float | None, at_least: bool = False
    ) -> None:
        """Finish a request on ``backend``: counters, latency, outlier detection.

        ``ok`` is False for a connection error, a timeout or an answer
        whose status :meth:`is_failure` (a 5xx by default, as Envoy's
        ``consecutive_5xx``); ``latency_ms`` is None when there is no
        meaningful sample (the client went away). ``at_least``: the request
        was cancelled unanswered (a hedge's loser), so ``latency_ms`` is only
        a lower bound of the backend's time: it raises the moving average
        when it is above it, and is no sample otherwise. (With no sample at
        all, a slow backend whose tries always lose would keep the average
        of its last answer, and p2c would go on sending it requests for
        hedges to rescue.)
        """
        changed = None
        streak = 0
        with self._lock:
            # _untake(), written out: this is every request's way out.
            if backend.active_requests == self.max_connections:
                self._saturated -= 1
            backend.active_requests -= 1
            self.active_requests -= 1
            backend.released_total += 1  # with failures_total: the interval detectors' counts
            if at_least:
                old = backend.latency_ewma_ms
                if latency_ms is not None and (old is None or latency_ms > old):
                    backend.record_latency(latency_ms, at=self._clock())
                latency_ms = None  # not an answer's time: no percentile, no RTT
            elif latency_ms is not None:
                backend.record_latency(latency_ms, failed=not ok, at=self._clock())
                backend.recent_ms.append(latency_ms)
            if self.adaptive is not None:
                # in flight as it was with this request still in it
                self.adaptive.sample(
                    latency_ms if ok else None, self.active_requests + 1, self._clock()
                )
            if self._released is not None:
                self._released(backend)
            if ok:
                streak = backend.consecutive_failures
                backend.consecutive_failures = 0
            else:
                backend.failures_total += 1
                backend.consecutive_failures += 1
                changed = self._maybe_eject(backend)
            if self._waiters:
                self._serve_waiters()
        if changed is not None:
            self._ejected(backend, changed)
        elif self.on_change is not None and self.outlier is not None:
            # Shared stores count failures across processes: each one, and
            # the success that ends a streak (never a plain success).
            if not ok:
                self.on_change(self, Change(Op.FAILURE, backend.url))
            elif streak:
                self.on_change(self, Change(Op.RECOVERED, backend.url))

    def is_failure(self, status: int) -> bool:
        """Whether an answer with ``status`` counts against its backend: in
        ``outlier_detection.failure_statuses`` when that table is given,
        else any 5xx."""
        return status in self.failure_statuses

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
            self.on_change(self, Change(Op.EJECT, backend.url, seconds=seconds))

    def try_acquire_retry(
        self, budget_percent: float | None = None, *, asking: bool = False
    ) -> bool:
        """Take a place in the retry budget; False when it is spent.

        ``budget_percent`` is the route's, where it has its own retry
        terms; the places it counts are the pool's, shared by every route.
        The budget is a share of the pool's active requests: those holding
        a backend, those between two tries (backing off), and the one
        asking, which has given its backend back (``asking``). Counting
        only the first, a few requests failing at once would shrink the
        base they are measured against: four clients whose requests all
        failed together found a budget of 100% spent after three retries.
        """
        with self._lock:
            active = self.active_requests + self.retries_waiting + asking
            if budget_percent is None:
                budget_percent = self.retries.budget_percent
            budget = max(RETRY_BUDGET_FLOOR, active * budget_percent / 100)
            if self.retries_active >= budget:
                return False
            self.retries_active += 1
            self.retries_waiting += 1
            return True

    def retry_began(self) -> None:
        """A granted retry's try has its backend."""
        with self._lock:
            self.retries_waiting -= 1

    def release_retry(self, *, began: bool = True) -> None:
        """A retry is over; ``began=False`` if its try never had a backend."""
        with self._lock:
            self.retries_active -= 1
            if not began:
                self.retries_waiting -= 1

    # --- runtime control ------------------------------------------------------

    def add_backend(self, url: str, weight: int = 1, *, backup: bool = False) -> Backend:
        """Add a backend at runtime; it takes traffic at once (after its first
        passing check, when active checks run)."""
        validate_backend(url, weight, backup=backup)
        backend = self._add_backend(url, weight, backup)
        self._announce(Change(Op.ADD, url, weight=weight, backup=backup))
        return backend

    def add_discovered(self, url: str, weight: int = 1, *, backup: bool = False) -> Backend:
        """Add a backend its discovery found, as :meth:`add_backend` does but
        not announced: every process resolves, or adopts the shared answer,
        on its own (see balancekit.discovery)."""
        validate_backend(url, weight, backup=backup)
        return self._add_backend(url, weight, backup, source="discovery")

    def set_backup(self, url: str, backup: bool) -> None:
        """Make a backend a backup or a primary in place, its live state kept
        (discovery: an SRV record's priority moved). Not announced."""
        with self._lock:
            self.backend(url).backup = backup
            self._rebuild()

    def remove_backend(self, url: str) -> None:
        """Remove a backend. Requests in flight on it finish normally."""
        self._remove_backend(url)
        self._announce(Change(Op.REMOVE, url))

    def drain(self, url: str) -> None:
        """No new requests; those in flight (and pinned sessions) finish."""
        self._update(url, draining=True)
        self._announce(Change(Op.DRAIN, url))

    def disable(self, url: str) -> None:
        """No traffic at all."""
        self._update(url, enabled=False)
        self._announce(Change(Op.DISABLE, url))

    def enable(self, url: str) -> None:
        """Undo :meth:`drain` and :meth:`disable`."""
        self._update(url, enabled=True, draining=False)
        self._announce(Change(Op.ENABLE, url))

    def set_weight(self, url: str, weight: int) -> None:
        """Change a backend's weight."""
        validate_backend(url, weight)
        self._set_weight(url, weight)
        self._announce(Change(Op.WEIGHT, url, weight=weight))

    def apply(self, change: Change) -> None:
        """Apply a change made elsewhere: by another process through the
        methods above (see :mod:`balancekit._coordination`), or by a reload.
        Not announced again, and idempotent: a change already in place, or
        about a backend this pool does not have, is skipped."""
        op, url = change.op, change.url
        backend = self._by_url.get(url)
        if op is Op.ADD:
            if backend is None:
                self._add_backend(url, change.weight, change.backup)
            return
        if backend is None:
            return
        if op is Op.REMOVE:
            self._remove_backend(url)
        elif op is Op.DRAIN and not backend.draining:
            self._update(url, draining=True)
        elif op is Op.DISABLE and backend.enabled:
            self._update(url, enabled=False)
        elif op is Op.ENABLE and (backend.draining or not backend.enabled):
            self._update(url, enabled=True, draining=False)
        elif op is Op.WEIGHT and backend.weight != change.weight:
            self._set_weight(url, change.weight)
        elif op is Op.EJECT:
            self._eject_for(backend, change.seconds)
        elif op is Op.HEALTH and backend.healthy != change.healthy:
            self._update(url, healthy=change.healthy)

    def _announce(self, change: Change) -> None:
        if self.on_change is not None:
            self.on_change(self, change)

    def _add_backend(
        self, url: str, weight: int, backup: bool, *, source: str = "runtime"
    ) -> Backend:
        with self._lock:
            if url in self._by_url:
                raise ValueError(f"pool {self.name!r} already has backend {url!r}")
            backend = Backend(url, weight, backup=backup)
            backend.source = source
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
            old = backend.state
            if not _outlier.eject_for(backend, seconds, self._clock()):
                return
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
            status = {
                "algorithm": self.algorithm.name,
                "panic": self.panic,
                "active_requests": self.active_requests,
                "retries_active": self.retries_active,
                "queued": len(self._waiters),
                "backends": [b.as_status() for b in self.backends],
            }
            if self.adaptive is not None:
                status["concurrency_limit"] = self.adaptive.limit
        if self.discovery is not None:
            status["discovery"] = self.discovery.as_status()
        return status

    # --- internals --------------------------------------------------------------

    def _add(self, backend: Backend) -> Backend:
        if backend.scheme == "https":
            backend.tls = self._tls
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
        slow = self._slow_start
        if slow is not None and self._started:
            joined = now_eligible - self._eligible
            if joined:
                slow.start(joined, self._clock())
        self._eligible = now_eligible
        self._primary, self._backup = primary, backup
        self._saturated = sum(1 for b in self.backends if b.active_requests >= self.max_connections)
        expiries = [b.ejected_until for b in self.backends if b.ejected_until]
        self._next_expiry = min(expiries, default=NEVER)
        self._schedule()
        if self._prepare is not None:
            for eligible_set in (self._backup, self._primary):
                if eligible_set:
                    self._prepare(eligible_set)
        if self._waiters:
            self._serve_waiters()  # a backend may have become eligible

    # --- timers: slow-start steps, ejections that end, outlier intervals -------

    def _schedule(self) -> None:
        # Under the lock: when the request path must next call _timers().
        slow = self._slow_start
        self._next_timer = min(
            self._next_expiry,
            NEVER if slow is None else slow.next_step,
            *(interval.due for interval in self._intervals),
        )

    def _timers(self) -> None:
        now = self._clock()
        slow = self._slow_start
        if slow is not None and slow.next_step <= now:
            with self._lock:
                slow.advance(now)
                self._rebuild()
        if self._next_expiry <= now:
            self._expire_ejections()
        if any(interval.due <= now for interval in self._intervals):
            self._close_intervals()

    def _maybe_eject(self, backend: Backend) -> tuple[BackendState, BackendState] | None:
        # Under the lock (see balancekit._outlier).
        outlier = self.outlier
        if outlier is None:
            return None
        old = backend.state
        duration = _outlier.eject(outlier, backend, self.backends, self._clock())
        if duration is None:
            return None
        self._rebuild()
        logger.warning(
            "pool %s: backend %s ejected for %.0fs after %d consecutive failures",
            self.name,
            backend.url,
            duration,
            outlier.consecutive_failures,
        )
        return old, backend.state

    def _close_intervals(self) -> None:
        # The success-rate and failure-percentage detectors whose interval is
        # over judge it; each backend they single out is ejected, by the
        # same rules (and cap) as for a failure streak.
        outlier = self.outlier
        if outlier is None:
            return
        ejected: list[tuple[Backend, tuple[BackendState, BackendState]]] = []
        with self._lock:
            now = self._clock()
            for interval in self._intervals:
                if interval.due > now:
                    continue  # another thread was first
                for backend, reason in interval.outliers(interval.close(self.backends, now)):
                    old = backend.state
                    duration = _outlier.take_out(outlier, backend, self.backends, now)
                    if duration is None:
                        continue
                    logger.warning(
                        "pool %s: backend %s ejected for %.0fs: %s",
                        self.name,
                        backend.url,
                        duration,
                        reason,
                    )
                    ejected.append((backend, (old, backend.state)))
            if ejected:
                self._rebuild()
            else:
                self._schedule()
        for backend, changed in ejected:
            self._ejected(backend, changed)

    def _expire_ejections(self) -> None:
        with self._lock:
            back = _outlier.expire(self.backends, self._clock())
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
