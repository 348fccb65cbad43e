"""Prequal: pick by the load the backends report, not by this process's view.

Wydrowski, Kleinberg, Rumble and Archer, "Load is not what you should
balance: Introducing Prequal" (NSDI 2024; in production at YouTube). Each
balancer probes backends for their requests in flight (RIF) and latency,
keeps the recent answers in a small pool, and picks hot-cold
lexicographically. What it buys over ``p2c`` is that a probe sees the
backend's whole load, also what other balancer processes (other workers,
other hosts) send it, which this process's own counts never show.

How it runs here:

- **Probes.** Every pick earns ``probe_rate`` probes (fractions add up
  from pick to pick), sent to random eligible backends after the pick is
  made: never on the request's path. A probe is ``GET probe_path`` over
  balancekit's own HTTP/1.1 client (the backend's TLS; its connection kept
  alive for the next probe, and closed when the event loop ends) within
  ``probe_timeout``, answered with
  ``{"in_flight": N, "latency_ms": X}`` (:mod:`balancekit.load_report`).
  At most one probe per backend and ``pool_size`` in all are in flight; a
  probe due beyond that is skipped. Probes run as tasks of the event loop
  that picks (ASGI); without one (WSGI) on one daemon thread per process
  with its own loop. Answers reach the pool through a queue that the next
  pick drains, so the pool changes under the pool's lock only.
- **The pool.** At most ``pool_size`` answers, one per backend (a newer
  answer replaces the older), the oldest pushed out when full. An answer
  older than ``max_age`` seconds, or used ``max_reuse`` times, is dropped.
  Each use adds one to its in-flight count, as the paper does: the request
  just sent is one more on that backend.
- **The pick.** The hot threshold is the ``hot_quantile`` (interpolated
  between ranks) of the in-flight counts of the last ``pool_size``
  answers, one per backend, reused or not: the load across backends as
  the recent probes saw it (recomputed when an answer comes, not per
  pick). Among the pool's answers for the eligible backends, those whose
  in-flight count is above the threshold are hot; the cold one with the
  lowest latency wins (fewer in flight breaks a tie), else the hot one
  with the fewest in flight. With no usable answer (at start-up, after an
  idle spell longer than ``max_age``) the pick is ``p2c``'s over this
  process's counts.
- **Backends that do not answer probes** (no endpoint, an error, a status
  other than 200, an answer that is not the JSON expected or over 4 KiB,
  or none within the timeout) are logged once and take part with this
  process's own counts: when one is due a probe, an entry that reads its
  ``active_requests`` and latency average live goes into the pool in its
  place. Such a backend is probed again after 1, 2, 4 ... at most 30
  seconds, so one that gains the endpoint, or was only slow once, is
  heard again.

A pick reads at most ``pool_size`` entries; sorting happens only when an
answer arrives, over at most ``pool_size`` numbers. Probes are this
process's alone: they are never shared through the store, since each
balancer's probes already see the backend's true load.

:meth:`Prequal.record_probe` takes an answer directly, and
:meth:`Prequal.send_probe` is the one method that starts a probe: a
simulator or a test can override it and answer with ``record_probe``.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import json
import logging
import math
import os
import random as _random
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import TimeoutError as FutureTimeout

from .._backend import Backend
from .._config import TimeoutsConfig
from .._exceptions import ProxyError
from .._request import RequestInfo
from .._transports.httptools import HttptoolsTransport
from ..load_report import DEFAULT_PATH
from .base import Algorithm
from .least_response_time import effective_latency
from .p2c import PowerOfTwoChoices

logger = logging.getLogger("balancekit")

#: The most of a probe's answer that is read; a longer one is ignored.
ANSWER_LIMIT = 4096
#: Seconds a backend that failed a probe waits for its next one: doubled
#: from the first after each failure in a row, at most the last.
RETRY_FIRST, RETRY_MAX = 1.0, 30.0
#: The half-life (s) of this process's latency samples, for backends
#: scored from its own counts (as ``p2c``'s default ``decay``).
LOCAL_DECAY = 10.0


class _Entry:
    """One answer in the pool: a probe's, or a stand-in read from this
    process's counts (``local``) for a backend that does not answer."""

    __slots__ = ("at", "backend", "in_flight", "latency_ms", "local", "uses")

    def __init__(
        self, backend: Backend, in_flight: float, latency_ms: float, at: float, local: bool
    ) -> None:
        self.backend = backend
        self.in_flight = in_flight
        self.latency_ms = latency_ms
        self.at = at
        self.uses = 0
        self.local = local


class _BadAnswer(Exception):
    """A probe's answer that cannot be used; the text says why."""


def parse_report(body: bytes) -> tuple[float, float]:
    """``(in_flight, latency_ms)`` from a probe's body; :class:`ValueError`
    (or a subclass) when it is not ``{"in_flight": N, "latency_ms": X}``
    with two finite numbers >= 0."""
    try:
        report = json.loads(body)
    except RecursionError:  # nested deeper than the parser goes
        raise ValueError("nested too deep") from None
    if not isinstance(report, dict):
        raise ValueError("not a JSON object")
    values = []
    for key in ("in_flight", "latency_ms"):
        value = report.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{key!r} is not a number")
        if not 0 <= value < 1e12:  # also NaN and the infinities
            raise ValueError(f"{key!r} out of range: {value!r}")
        values.append(float(value))
    return values[0], values[1]


def interpolated(ordered: Sequence[float], q: float) -> float:
    """The ``q`` quantile of sorted values, interpolated between ranks (so
    that among three backends one outlier can be above the 0.8 quantile)."""
    position = q * (len(ordered) - 1)
    low = int(position)
    if low + 1 >= len(ordered):
        return ordered[-1]
    return ordered[low] + (ordered[low + 1] - ordered[low]) * (position - low)


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _count(value: object) -> bool:
    """A positive integer (not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


class Prequal(Algorithm):
    name = "prequal"

    def __init__(
        self,
        *,
        probe_rate: float = 3.0,
        pool_size: int = 16,
        max_reuse: int | None = None,
        max_age: float = 1.0,
        hot_quantile: float = 0.8,
        probe_path: str = DEFAULT_PATH,
        probe_timeout: float = 0.5,
        rng: _random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not _number(probe_rate) or not 0 <= probe_rate <= 1000:
            raise ValueError(
                f"probe_rate: must be a number of probes per request >= 0, got {probe_rate!r}"
            )
        if not _count(pool_size):
            raise ValueError(f"pool_size: must be a positive integer, got {pool_size!r}")
        if max_reuse is None:
            # Enough that the answers coming in offer about twice the uses
            # the picks take (one each), and at least two.
            max_reuse = max(2, math.ceil(2 / probe_rate)) if probe_rate else 2
        elif not _count(max_reuse):
            raise ValueError(f"max_reuse: must be a positive integer, got {max_reuse!r}")
        if not _number(max_age) or not max_age > 0:
            raise ValueError(f"max_age: must be a positive number of seconds, got {max_age!r}")
        if not _number(hot_quantile) or not 0 < hot_quantile < 1:
            raise ValueError(
                f"hot_quantile: must be a number strictly between 0 and 1, got {hot_quantile!r}"
            )
        path: object = probe_path  # checked as TOML may hold anything
        if not isinstance(path, str) or not path.startswith("/"):
            raise ValueError(f"probe_path: must be a path starting with '/', got {probe_path!r}")
        if not _number(probe_timeout) or not probe_timeout > 0:
            raise ValueError(
                f"probe_timeout: must be a positive number of seconds, got {probe_timeout!r}"
            )
        self.probe_rate = float(probe_rate)
        self.pool_size = pool_size
        self.max_reuse = max_reuse
        self.max_age = float(max_age)
        self.hot_quantile = float(hot_quantile)
        self.probe_path = probe_path
        self.probe_timeout = float(probe_timeout)
        self._rng = rng or _random.Random()
        self._clock = clock
        self._fallback = PowerOfTwoChoices(decay=LOCAL_DECAY, rng=self._rng, clock=clock)
        # The pool: usable answers by backend, oldest first.
        self._pool: dict[Backend, _Entry] = {}
        # The last answers' in-flight counts, one per backend, oldest first,
        # and the hot threshold they give.
        self._recent: dict[Backend, tuple[float, float]] = {}
        self._threshold = math.inf
        # Answers and failures from probes in flight, drained by the next pick.
        self._inbox: collections.deque[tuple[Backend, float, float, float, str]] = (
            collections.deque()
        )
        self._probing: dict[Backend, float] = {}  # probes in flight: when each began
        self._credit = 0.0
        # Backends that failed their last probe: (failures in a row, next try).
        self._failing: dict[Backend, tuple[int, float]] = {}
        self._members: frozenset[Backend] = frozenset()
        self._members_of: Sequence[Backend] = ()
        self._pid = os.getpid()
        self._timeouts = TimeoutsConfig(
            connect=self.probe_timeout, read=self.probe_timeout, write=self.probe_timeout
        )

    # --- the pick ------------------------------------------------------------

    def pick(self, backends: Sequence[Backend], request: RequestInfo) -> Backend:
        if not backends:
            raise ValueError("pick() needs at least one backend")
        now = self._clock()
        if self._inbox:
            self._drain(now)
        chosen = self._choose(backends, request, now)
        if self.probe_rate:
            self._credit += self.probe_rate
            if self._credit >= 1:
                self._schedule(backends, now)
        return chosen

    def _choose(self, backends: Sequence[Backend], request: RequestInfo, now: float) -> Backend:
        pool = self._pool
        oldest = now - self.max_age
        # Oldest first: the answers past max_age are at the front.
        while pool:
            first = next(iter(pool.values()))
            if first.at >= oldest:
                break
            del pool[first.backend]
        members = self._eligible(backends)
        threshold = self._threshold
        cold = hot = None
        cold_latency = cold_load = hot_latency = hot_load = 0.0
        for entry in pool.values():
            backend = entry.backend
            if backend not in members:
                continue
            if entry.local:  # this process's counts, read now
                entry.in_flight = backend.active_requests
                entry.latency_ms = max(effective_latency(backend, now, LOCAL_DECAY), 0.0)
            load, latency = entry.in_flight, entry.latency_ms
            if load > threshold:  # hot: the fewest in flight, then the fastest
                if hot is None or load < hot_load or (load == hot_load and latency < hot_latency):
                    hot, hot_load, hot_latency = entry, load, latency
            elif (  # cold: the fastest, then the fewest in flight
                cold is None
                or latency < cold_latency
                or (latency == cold_latency and load < cold_load)
            ):
                cold, cold_latency, cold_load = entry, latency, load
        best = cold or hot
        if best is None:
            return self._fallback.pick(backends, request)
        best.uses += 1
        if best.uses >= self.max_reuse:
            del pool[best.backend]
        elif not best.local:
            best.in_flight += 1  # the request about to be sent there
        return best.backend

    def _eligible(self, backends: Sequence[Backend]) -> frozenset[Backend]:
        # The pool hands the same tuple until eligibility changes: a set of
        # it is made once per change (any other sequence, every time).
        if backends is self._members_of:
            return self._members
        members = frozenset(backends)
        if isinstance(backends, tuple):
            self._members, self._members_of = members, backends
        return members

    def prepare(self, backends: Sequence[Backend]) -> None:
        # Forget backends that left the pool for good.
        for table in (self._pool, self._recent, self._failing):
            for backend in [b for b in table if b.removed]:
                del table[backend]

    # --- answers -------------------------------------------------------------

    def record_probe(
        self,
        backend: Backend,
        in_flight: float,
        latency_ms: float,
        *,
        at: float | None = None,
    ) -> None:
        """An answer of ``backend``'s probe, taken at ``at`` (the clock's
        now by default); the next pick puts it in the pool. Safe from any
        thread."""
        when = self._clock() if at is None else at
        self._inbox.append((backend, float(in_flight), float(latency_ms), when, ""))

    def record_failure(self, backend: Backend, reason: str) -> None:
        """``backend``'s probe failed (``reason`` says how): it is scored
        from this process's counts until a later probe answers."""
        self._inbox.append((backend, 0.0, 0.0, self._clock(), reason or "failed"))

    def _drain(self, now: float) -> None:
        # Under the pool's lock: move what the probes brought into the pool.
        inbox, probing = self._inbox, self._probing
        changed = False
        while inbox:
            backend, in_flight, latency_ms, at, failure = inbox.popleft()
            probing.pop(backend, None)
            if failure:
                self._failed(backend, failure, now)
                continue
            if backend in self._failing:
                del self._failing[backend]
                logger.info("prequal: backend %s answers its load probe again", backend.url)
            self._add(_Entry(backend, in_flight, latency_ms, at, local=False))
            changed = True
        if changed:
            self._rethreshold(now)

    def _add(self, entry: _Entry) -> None:
        backend = entry.backend
        pool = self._pool
        pool.pop(backend, None)  # a newer answer replaces the older
        pool[backend] = entry
        if len(pool) > self.pool_size:
            del pool[next(iter(pool))]
        recent = self._recent
        recent.pop(backend, None)
        recent[backend] = (entry.in_flight, entry.at)
        if len(recent) > self.pool_size:
            del recent[next(iter(recent))]

    def _rethreshold(self, now: float) -> None:
        recent = self._recent
        oldest = now - self.max_age
        while recent:  # oldest first, as in the pool
            backend = next(iter(recent))
            if recent[backend][1] >= oldest:
                break
            del recent[backend]
        values = sorted([in_flight for in_flight, _ in recent.values()])
        self._threshold = interpolated(values, self.hot_quantile) if values else math.inf

    def _failed(self, backend: Backend, reason: str, now: float) -> None:
        failures, _ = self._failing.get(backend, (0, 0.0))
        if not failures:
            logger.warning(
                "prequal: backend %s does not answer its load probe (%s); it is scored from"
                " this balancer's own counts until it does",
                backend.url,
                reason,
            )
        delay = min(RETRY_FIRST * 2**failures, RETRY_MAX)
        self._failing[backend] = (failures + 1, now + delay)

    # --- probes --------------------------------------------------------------

    def _schedule(self, backends: Sequence[Backend], now: float) -> None:
        # Under the pool's lock: spend whole probes of the credit on random
        # eligible backends, skipping those probed now and over the bound.
        due = int(self._credit)
        self._credit -= due
        due = min(due, self.pool_size)
        if self._pid != os.getpid():  # a forked child: the parent's probes are not ours
            self._pid = os.getpid()
            self._probing.clear()
            self._inbox.clear()
        probing = self._probing
        # A probe whose answer never came (its loop ended first) stops
        # counting once it is well past its timeout.
        lost = now - 2 * self.probe_timeout - 1.0
        if len(probing) >= self.pool_size:
            for backend in [b for b, began in probing.items() if began < lost]:
                del probing[backend]
        count = len(backends)
        rng = self._rng
        stood_in = False
        for _ in range(due):
            backend = backends[int(rng.random() * count)]
            began = probing.get(backend)
            if (began is not None and began >= lost) or len(probing) >= self.pool_size:
                continue
            failing = self._failing.get(backend)
            if failing is not None and now < failing[1]:
                # Not heard from: stand in with this process's counts.
                self._add(_Entry(backend, backend.active_requests, 0.0, now, local=True))
                stood_in = True
                continue
            probing[backend] = now
            self.send_probe(backend)
        if stood_in:
            self._rethreshold(now)

    def send_probe(self, backend: Backend) -> None:
        """Start one probe of ``backend``, answered later through
        :meth:`record_probe` or :meth:`record_failure` (exactly one of
        them). Called under the pool's lock: it only schedules the probe,
        on the running event loop or, without one, on the probe thread."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            _probe_thread.loop().call_soon_threadsafe(self._launch, backend)
        else:
            self._launch(backend)

    def _launch(self, backend: Backend) -> None:
        _hold(asyncio.get_running_loop().create_task(self._probe(backend)))

    async def _probe(self, backend: Backend) -> None:
        reason = "the probe did not finish"
        try:
            async with asyncio.timeout(self.probe_timeout):
                in_flight, latency_ms = await self._ask(backend)
        except TimeoutError:
            reason = f"no answer within probe_timeout = {self.probe_timeout} s"
        except (ProxyError, OSError) as exc:
            reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        except _BadAnswer as exc:
            reason = str(exc)
        else:
            reason = ""
            self.record_probe(backend, in_flight, latency_ms)
        finally:
            if reason:  # also when cancelled, or on a bug: the probe ends here
                self.record_failure(backend, reason)

    async def _ask(self, backend: Backend) -> tuple[float, float]:
        transport = _client(asyncio.get_running_loop())
        headers = [(b"host", backend.host_header_raw), (b"accept", b"application/json")]
        response = await transport.send(
            backend, "GET", self.probe_path, headers, None, self._timeouts
        )
        try:
            if response.status != 200:
                raise _BadAnswer(f"status {response.status} for {self.probe_path}")
            body = b""
            while chunk := await response.read():
                body += chunk
                if len(body) > ANSWER_LIMIT:
                    raise _BadAnswer(f"an answer longer than {ANSWER_LIMIT} bytes")
        finally:
            await response.aclose()  # kept alive only when read to its end
        try:
            return parse_report(body)
        except ValueError as exc:
            raise _BadAnswer(f"not the JSON load report ({exc})") from None


#: Per event loop, the probes' HTTP client (shared by every pool's
#: ``prequal``), its connections kept alive from probe to probe.
_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, HttptoolsTransport] = (
    weakref.WeakKeyDictionary()
)
#: The probes' tasks, and each client's closer, until they end: held here,
#: not by an algorithm that a reload may drop while they run.
_tasks: set[asyncio.Task[None]] = set()


def _hold(task: asyncio.Task[None]) -> None:
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)


def _client(loop: asyncio.AbstractEventLoop) -> HttptoolsTransport:
    transport = _clients.get(loop)
    if transport is None:
        transport = _clients[loop] = HttptoolsTransport()
        _hold(loop.create_task(_close_at_the_end(transport)))
    return transport


async def _close_at_the_end(transport: HttptoolsTransport) -> None:
    """Wait for the end of the loop (``asyncio.run`` cancels the tasks
    left then, as the probe thread does at exit), and close ``transport``'s
    idle connections."""
    loop = asyncio.get_running_loop()
    try:
        await loop.create_future()
    finally:
        if _clients.get(loop) is transport:
            del _clients[loop]
        await transport.aclose()


class _ProbeThread:
    """One daemon thread per process with an event loop, for the probes of
    pools picked without a running loop (the WSGI engine); started by the
    first such probe, made anew in a forked child, stopped at exit."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._pid = 0

    def loop(self) -> asyncio.AbstractEventLoop:
        loop = self._loop
        if loop is not None and self._pid == os.getpid():
            return loop
        with self._lock:
            if self._loop is None or self._pid != os.getpid():
                loop = asyncio.new_event_loop()
                thread = threading.Thread(
                    target=loop.run_forever, name="balancekit-prequal", daemon=True
                )
                thread.start()
                self._loop, self._thread, self._pid = loop, thread, os.getpid()
            return self._loop

    def stop(self) -> None:
        with self._lock:
            loop, thread = self._loop, self._thread
            if loop is None or thread is None or self._pid != os.getpid():
                return
            self._loop = self._thread = None
        future = asyncio.run_coroutine_threadsafe(_cancel_all(), loop)
        try:
            future.result(2 * RETRY_FIRST)
        except (FutureTimeout, RuntimeError):
            logger.debug("prequal: probes did not stop in time")
        loop.call_soon_threadsafe(loop.stop)
        thread.join(2 * RETRY_FIRST)
        if not thread.is_alive():
            loop.close()

    def forget(self) -> None:
        # In a forked child: the parent's thread is not there.
        self._lock = threading.Lock()
        self._loop = self._thread = None
        self._pid = 0


async def _cancel_all() -> None:
    current = asyncio.current_task()
    tasks = [task for task in asyncio.all_tasks() if task is not current]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


_probe_thread = _ProbeThread()
atexit.register(_probe_thread.stop)
os.register_at_fork(after_in_child=_probe_thread.forget)

__all__ = ["Prequal", "interpolated", "parse_report"]
