"""The Balancer: pools, routes, plugins and the proxy engine, built once."""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from ._backend import Backend, BackendState
from ._changes import Change, Op
from ._classify import Model, classify
from ._config import (
    BalancerConfig,
    PoolConfig,
    did_you_mean,
    load_config,
)
from ._exceptions import ConfigError, Problem
from ._forwarding import TrustedProxies
from ._plugins import PluginManager, build_plugin, make_plugin_manager
from ._pool import Pool
from ._routing import Route, RouteTable, route_from_config
from ._upstream_tls import UpstreamTLS, upstream_tls
from .discovery._runner import DEFAULT_INTERVAL, DiscoveryRunner, DiscoveryStatus
from .metrics import Metrics, available as metrics_available
from .stores import GuardedStore, MemoryStore, RedisStore

if TYPE_CHECKING:
    from ._admin import AdminEndpoint
    from ._background import BackgroundLoop
    from ._classify import Classification
    from ._coordination import Coordinator
    from ._engine_async import AsyncEngine
    from ._engine_sync import SyncEngine
    from ._tracing import Tracing
    from ._types import RawHeaders, SupportsPick
    from .health._scheduler import HealthScheduler
    from .status import StatusEndpoint

logger = logging.getLogger("balancekit")

ConfigInput = Mapping[str, Any] | str | os.PathLike[str] | BalancerConfig

_SCHEDULER_KEYS = ("type", "interval", "rise", "fall")


class Balancer:
    """Everything balancekit knows at run time, built from one configuration.

    >>> balancer = Balancer({"pools": {"api": {"backends": ["http://127.0.0.1:9001"]}},
    ...                      "routes": [{"prefix": "/api/", "pool": "api"}]})
    >>> balancer.pools["api"].backends[0].url
    'http://127.0.0.1:9001'

    Every configuration problem, including a plugin's own options, is a
    :class:`ConfigError` raised here, never on a request. A Balancer is safe
    to share between threads and tasks, and between adapters.
    """

    def __init__(
        self,
        config: ConfigInput | None = None,
        *,
        plugin_manager: PluginManager | None = None,
        clock: Callable[[], float] = time.monotonic,
        metrics_registry: Any = None,
    ) -> None:
        #: Every pool reads time here: ejection windows, slow-start ramps and
        #: latency sample ages. Tests pass a clock they move by hand.
        self.clock = clock
        self.config = load_config(config if config is not None else {})
        #: The file this balancer was made from, which the admin API's
        #: ``POST reload`` reads again (None for a dict or a parsed config).
        self.config_path: str | None = (
            os.fspath(config) if isinstance(config, str | os.PathLike) else None
        )
        self.plugins = plugin_manager or make_plugin_manager()
        self.trusted_proxies = TrustedProxies(self.config.trusted_proxies)
        self.routes = _route_table(self.config)
        problems: list[Problem] = []
        store = self._build_store(problems)
        #: The configured store behind its guard: an outage never fails a request.
        self.store = GuardedStore(store if store is not None else MemoryStore(), clock=clock)
        self.pools: dict[str, Pool] = {}
        self._health: dict[str, tuple[type[Any], dict[str, Any]]] = {}
        #: Per pool with discovery: its class, options and interval.
        self._discovery: dict[str, tuple[type[Any], dict[str, Any], float]] = {}
        for name, pool_config in self.config.pools.items():
            pool = self._build_pool(name, pool_config, problems)
            if pool is not None:
                self.pools[name] = pool
        if problems:
            raise ConfigError(problems)
        _warn_unverified(self.pools, {})
        #: Prometheus metrics: on with the status path (when prometheus-client
        #: is installed), or whenever a registry is given.
        self.metrics: Metrics | None = None
        if metrics_registry is not None or (self.config.status.enabled and metrics_available()):
            self.metrics = Metrics(metrics_registry)
            self.metrics.bind(self)
            for name, pool in self.pools.items():
                pool.metrics = self.metrics.pool(name)
        #: The status path's endpoint, when ``[status] enabled`` (a restart
        #: changes it, never a reload).
        self.status_endpoint: StatusEndpoint | None = None
        if self.config.status.enabled:
            from .status import StatusEndpoint

            self.status_endpoint = StatusEndpoint(self)
        #: The admin HTTP API, when ``[admin] enabled`` (a restart changes it).
        self.admin_endpoint: AdminEndpoint | None = None
        if self.config.admin.enabled:
            from ._admin import AdminEndpoint

            self.admin_endpoint = AdminEndpoint(self)
        self._model = self._make_model()
        #: With a shared store, what keeps this process in step with the others.
        self.coordinator: Coordinator | None = None
        if isinstance(store, RedisStore):
            from ._coordination import Coordinator

            self.coordinator = Coordinator(self, store)
        # Per event loop, and forgotten with the loop: aiohttp sessions and
        # health-check tasks belong to the loop that made them.
        self._engines: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AsyncEngine] = (
            weakref.WeakKeyDictionary()
        )
        self._schedulers: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, list[HealthScheduler | DiscoveryRunner]
        ] = weakref.WeakKeyDictionary()
        self._last_engine: AsyncEngine | None = None
        self._lock = threading.Lock()
        # The WSGI side: one engine and one background thread per process.
        self._sync_engine: SyncEngine | None = None
        self._background: BackgroundLoop | None = None

    # --- construction -------------------------------------------------------------

    def _plugin(self, kind: str, name: str, path: str, problems: list[Problem]) -> type[Any] | None:
        classes = self.plugins.classes(kind)
        if name in classes:
            return classes[name][0]
        hint = did_you_mean(name, list(classes))
        known = ", ".join(sorted(classes)) or "none"
        problems.append(Problem(path, f"unknown {kind} {name!r}{hint} (available: {known})"))
        return None

    def _construct(
        self,
        cls: type[Any],
        options: dict[str, Any],
        path: str,
        problems: list[Problem],
        **seams: Any,
    ) -> Any:
        """:func:`build_plugin`, its problems collected with the others."""
        try:
            return build_plugin(cls, options, path, **seams)
        except ConfigError as exc:
            problems.extend(exc.problems)
            return None

    def _upstream_tls(
        self, name: str, config: PoolConfig, problems: list[Problem], previous: UpstreamTLS | None
    ) -> UpstreamTLS | None:
        if config.tls is None:
            return None
        try:
            return upstream_tls(config.tls, f"pools.{name}.tls", previous)
        except ConfigError as exc:
            problems.extend(exc.problems)
            return None

    def _build_pool(
        self,
        name: str,
        config: PoolConfig,
        problems: list[Problem],
        previous_tls: UpstreamTLS | None = None,
    ) -> Pool | None:
        where = f"pools.{name}"
        tls = self._upstream_tls(name, config, problems, previous_tls)
        cls = self._plugin("algorithm", config.algorithm.name, f"{where}.algorithm", problems)
        algorithm: SupportsPick | None = None
        if cls is not None:
            algorithm = self._construct(
                cls, config.algorithm.options, f"{where}.algorithm", problems, clock=self.clock
            )
        check = config.health_check
        if check.type != "none":
            check_cls = self._plugin(
                "health check", check.type, f"{where}.health_check.type", problems
            )
            if check_cls is not None:
                options = check.options
                instance = self._construct(
                    check_cls, options, f"{where}.health_check", problems, clock=self.clock
                )
                if instance is not None:
                    self._health[name] = (check_cls, options)
        persistence = None
        if config.persistence is not None:
            persistence_cls = self._plugin(
                "persistence", config.persistence.type, f"{where}.persistence.type", problems
            )
            if persistence_cls is not None:
                persistence = self._construct(
                    persistence_cls,
                    config.persistence.options,
                    f"{where}.persistence",
                    problems,
                    clock=self.clock,
                    pool=name,
                    secrets=self.config.secrets,
                    store=self.store,
                )
        self._build_discovery(name, config, problems)
        if algorithm is None:
            return None
        pool = Pool(
            name, config, algorithm, on_state_change=self._state_changed, clock=self.clock, tls=tls
        )
        pool.active_checks = name in self._health
        pool.persistence = persistence
        if name in self._discovery and config.discovery is not None:
            pool.discovery = DiscoveryStatus(config.discovery.type)
        return pool

    def _build_discovery(self, name: str, config: PoolConfig, problems: list[Problem]) -> None:
        # Built once here so that its options are a ConfigError at start-up;
        # the running instance is made in the loop that runs it.
        table = config.discovery
        if table is None:
            return
        where = f"pools.{name}.discovery"
        cls = self._plugin("discovery", table.type, f"{where}.type", problems)
        if cls is None:
            return
        options = table.options
        if table.interval is not None and "interval" in _parameters(cls):
            options["interval"] = table.interval
        instance = self._construct(cls, options, where, problems)
        if instance is not None:
            interval = table.interval
            if interval is None:
                default = getattr(instance, "interval", None)
                interval = DEFAULT_INTERVAL
                if isinstance(default, int | float) and not isinstance(default, bool):
                    interval = float(default)
            self._discovery[name] = (cls, options, interval)

    def _build_store(self, problems: list[Problem]) -> Any:
        scheme = self.config.store.partition("://")[0]
        cls = self._plugin("store", scheme, "store", problems)
        if cls is None:
            return None
        try:
            return cls(self.config.store)
        except (TypeError, ValueError) as exc:
            problems.append(Problem("store", str(exc)))
            return None

    # --- run time ----------------------------------------------------------------

    def _tracing(self) -> Tracing | None:
        if not self.config.tracing:
            return None
        from ._tracing import Tracing  # OpenTelemetry is loaded only when asked for

        return Tracing()

    def _make_model(self) -> Model:
        return Model(
            self.routes,
            self.pools,
            self.trusted_proxies,
            self.config.access_log,
            self.status_endpoint,
            self.config.request_id.lower().encode("latin-1"),
            self._tracing(),
            self.admin_endpoint,
        )

    def classify(
        self,
        method: str,
        raw_path: str,
        headers: RawHeaders | Callable[[], RawHeaders],
        *,
        query: str = "",
        client_ip: str = "",
        scheme: str = "http",
        http_version: str = "1.1",
        route: Route | None = None,
    ) -> Classification:
        """What a request is to balancekit: the one call every adapter makes
        first, with no I/O (see :mod:`balancekit.adapter`).

        ``raw_path`` is the path as the client sent it, percent-encoding
        kept; ``headers`` the raw header pairs (lower-case names), or a
        function that builds them, called only for a request that is routed
        (a WSGI adapter's, from its environ: most requests are not ours);
        ``http_version`` as ASGI gives it. An adapter that routed the
        request itself (Flask's ``kit.proxy`` views) passes its ``route``.
        """
        return classify(
            self._model, method, raw_path, headers, query, client_ip, scheme, http_version, route
        )

    def route_for(self, path: str) -> Route | None:
        """The route serving ``path`` (already normalised), or None."""
        return self.routes.match(path)

    def status(self) -> dict[str, Any]:
        """The same dict as ``status.json``."""
        return {"pools": {name: pool.status() for name, pool in self.pools.items()}}

    def engine(self, loop: asyncio.AbstractEventLoop | None = None) -> AsyncEngine:
        """The async engine of the running event loop (one per loop).

        A caller that knows it runs in ``loop`` (a server, on its own loop)
        passes it: asking asyncio for the running loop costs a ``getpid()``
        system call, too much for every request.
        """
        engine = self._last_engine
        if engine is not None and engine.loop is (loop or asyncio.get_running_loop()):
            return engine  # the usual case: one loop per process
        loop = loop or asyncio.get_running_loop()
        engine = self._engines.get(loop)
        if engine is None:
            from ._engine_async import AsyncEngine

            with self._lock:
                engine = self._engines.get(loop)
                if engine is None:
                    engine = self._engines[loop] = AsyncEngine(self.config.transport)
        self._last_engine = engine
        return engine

    def sync_engine(self) -> SyncEngine:
        """The sync engine of this process (a forked child makes its own)."""
        engine = self._sync_engine
        if engine is None:
            from ._engine_sync import SyncEngine

            with self._lock:
                engine = self._sync_engine
                if engine is None:
                    engine = self._sync_engine = SyncEngine(self.config.transport)
                    _process_local.add(self)
                    hedged = [name for name, pool in self.pools.items() if pool.config.hedge]
                    if hedged:
                        logger.warning(
                            "pools %s: hedge is done by the async engine only; under WSGI"
                            " each request is sent once (with retries as configured)",
                            ", ".join(hedged),
                        )
        return engine

    def start_background(self) -> None:
        """Run the health checks in a daemon thread of this process, unless
        they run already (in that thread or in an ASGI server's loop)."""
        background = self._background
        if background is None:
            from ._background import BackgroundLoop

            with self._lock:
                background = self._background
                if background is None:
                    background = self._background = BackgroundLoop(self)
        background.ensure_started()

    def close(self) -> None:
        """The sync counterpart of :meth:`aclose`: stop the background thread
        and close the sync engine's upstream connections."""
        with self._lock:
            background, self._background = self._background, None
            engine, self._sync_engine = self._sync_engine, None
        if background is not None:
            background.stop()
        if engine is not None:
            engine.close()
        self.store.close()

    async def astart(self) -> None:
        """Start the active health checks in the running loop, unless they
        run in another loop of this process already (idempotent)."""

        loop = asyncio.get_running_loop()
        if self.metrics is not None:
            self.metrics.start()  # several workers: each writes its pool gauges
        with self._lock:
            if any(not other.is_closed() for other in self._schedulers):
                return  # one set of checks per process: every loop shares the pools
            schedulers = self._schedulers[loop] = []
        if self.coordinator is not None:
            await self.coordinator.start()
            if self._schedulers.get(loop) is not schedulers:
                return  # closed while it started: nothing new outlives it
        schedulers.extend(self._start_schedulers())

    def _start_schedulers(self) -> list[HealthScheduler | DiscoveryRunner]:
        from .health._scheduler import HealthScheduler

        started: list[HealthScheduler | DiscoveryRunner] = []
        for name, (cls, options) in self._health.items():
            check = self.config.pools[name].health_check
            # A check of its own per start: its connections belong to the
            # loop (and the process) that runs it.
            instance = build_plugin(cls, options, f"pools.{name}.health_check", clock=self.clock)
            scheduler = HealthScheduler(
                self.pools[name],
                instance,
                interval=check.interval,
                rise=check.rise,
                fall=check.fall,
                coordinator=self.coordinator,
            )
            scheduler.start()
            started.append(scheduler)
        for name, (cls, options, interval) in self._discovery.items():
            pool = self.pools[name]
            runner = DiscoveryRunner(
                pool,
                build_plugin(cls, options, f"pools.{name}.discovery"),
                type_name=cls.name,
                interval=interval,
                coordinator=self.coordinator,
            )
            runner.start()
            started.append(runner)
        return started

    async def _restart_checks(self) -> None:
        loop = asyncio.get_running_loop()
        old = self._schedulers.get(loop)
        if old is None:
            return
        for scheduler in old:
            await scheduler.stop()
        if self._schedulers.get(loop) is not old:
            return  # closed while the old ones stopped: nothing new outlives it
        old[:] = self._start_schedulers()

    def reload(self, config: ConfigInput) -> None:
        """Serve ``config`` from now on, without a restart.

        Pools whose settings are unchanged keep their backends' live state
        (health, counters, ejections) and only gain or lose the backends that
        were added or removed; a pool whose settings changed is built anew,
        and health checks restart for the new set of pools. Top-level keys
        other than ``pools``, ``routes``, ``trusted_proxies`` and ``access_log``
        need a restart. A bad configuration raises :class:`ConfigError` and
        changes nothing.
        """
        new = load_config(config)
        problems: list[Problem] = []
        for key in ("store", "transport", "secret", "status", "admin", "serve"):
            if getattr(new, key) != getattr(self.config, key):
                problems.append(Problem(key, "cannot change without a restart"))
        kept_health, self._health = self._health, {}
        kept_discovery, self._discovery = self._discovery, {}
        pools: dict[str, Pool] = {}
        # A kept pool's context, rebuilt when its files changed on disk.
        rotated: dict[str, UpstreamTLS | None] = {}
        for name, pool_config in new.pools.items():
            old = self.pools.get(name)
            if old is not None and _settings(old.config) == _settings(pool_config):
                pools[name] = old
                if name in kept_health:
                    self._health[name] = kept_health[name]
                if name in kept_discovery:
                    self._discovery[name] = kept_discovery[name]
                tls = self._upstream_tls(name, pool_config, problems, old.tls)
                if tls is not old.tls:
                    rotated[name] = tls
                continue
            previous = old.tls if old is not None else None
            pool = self._build_pool(name, pool_config, problems, previous)
            if pool is not None:
                pools[name] = pool
        if problems:
            self._health = kept_health
            self._discovery = kept_discovery
            raise ConfigError(problems)
        before = {name: pool.tls for name, pool in self.pools.items()}
        for name, tls in rotated.items():
            pools[name].tls = tls
        for name, pool in pools.items():
            if self.pools.get(name) is pool:
                _follow_backends(pool, new.pools[name])
            pool.config = new.pools[name]
        rebuilt = pools.keys() != self.pools.keys() or any(
            self.pools.get(name) is not pool for name, pool in pools.items()
        )
        with self._lock:
            self.config = new
            self.trusted_proxies = TrustedProxies(new.trusted_proxies)
            self.routes = _route_table(new)
            self.pools = pools
            self._model = self._make_model()
            loops = [loop for loop in self._schedulers if not loop.is_closed()]
        for name, pool in pools.items():
            if self.coordinator is not None:
                pool.on_change = self.coordinator.announce
            if self.metrics is not None and pool.metrics is None:
                pool.metrics = self.metrics.pool(name)
        if rebuilt:
            for loop in loops:
                asyncio.run_coroutine_threadsafe(self._restart_checks(), loop)
        _warn_unverified(pools, before)
        logger.info("configuration reloaded: %d pools, %d routes", len(pools), len(self.routes))

    async def aclose(self) -> None:
        """Stop this loop's health checks and close its upstream connections."""
        loop = asyncio.get_running_loop()
        with self._lock:
            schedulers = self._schedulers.pop(loop, None)
            engine = self._engines.pop(loop, None)
            if self._last_engine is engine:
                self._last_engine = None
        if schedulers is not None:  # the background work ran in this loop
            for scheduler in schedulers:
                await scheduler.stop()
            if self.coordinator is not None:
                await self.coordinator.stop()
        if engine is not None:
            await engine.aclose()
        await self.store.aclose()  # this loop's connections to it

    def _state_changed(
        self, pool: Pool, backend: Backend, old: BackendState, new: BackendState
    ) -> None:
        logger.info("pool %s: backend %s %s -> %s", pool.name, backend.url, old.value, new.value)
        hook = self.plugins.pm.hook.balancekit_backend_state_changed
        for impl in hook.get_hookimpls():
            try:
                impl.function(pool=pool, backend=backend, old=old, new=new)
            except Exception:  # an observer's bug must not affect balancing
                logger.exception(
                    "plugin %r failed in balancekit_backend_state_changed",
                    self.plugins.pm.get_name(impl.plugin),
                )


def _warn_unverified(pools: dict[str, Pool], before: dict[str, UpstreamTLS | None]) -> None:
    """One warning per pool whose new context verifies nothing (none for a
    context a reload kept)."""
    for name, pool in pools.items():
        tls = pool.tls
        if tls is not None and not tls.verify and before.get(name) is not tls:
            logger.warning(
                "pool %s: tls.verify = false: its backends' certificates and names are not "
                "checked, so whoever is on the path to them can read and change the traffic",
                name,
            )


def _parameters(cls: type[Any]) -> Mapping[str, Any]:
    try:
        return inspect.signature(cls).parameters
    except (TypeError, ValueError):  # no signature to read
        return {}


def _settings(config: PoolConfig) -> dict[str, Any]:
    """A pool's configuration but its backends: what a reload can't change in place."""
    return config.model_dump(exclude={"backends"})


def _follow_backends(pool: Pool, config: PoolConfig) -> None:
    """Bring ``pool``'s backends to ``config``'s, keeping the live state of
    those that stay (not announced: every process reloads the same config).
    Discovered backends are discovery's, unless the configuration now
    lists them."""
    wanted = {b.url: b for b in config.backends}
    for backend in list(pool.backends):
        target = wanted.get(backend.url)
        if backend.source == "discovery":
            if target is None:
                continue
            backend.source = "config"
        if target is None or target.backup != backend.backup:
            pool.apply(Change(Op.REMOVE, backend.url))
        else:
            pool.apply(Change(Op.WEIGHT, backend.url, weight=target.weight))
    for url, target in wanted.items():
        pool.apply(Change(Op.ADD, url, weight=target.weight, backup=target.backup))


#: Balancers with per-process state to forget in a forked child.
_process_local: weakref.WeakSet[Balancer] = weakref.WeakSet()


def _forget_after_fork() -> None:
    # Connection pools must not cross a fork: the child makes its own.
    for balancer in list(_process_local):
        balancer._sync_engine = None
        balancer._lock = threading.Lock()
    _process_local.clear()


os.register_at_fork(after_in_child=_forget_after_fork)


def balancer_from(config: ConfigInput | None, balancer: Balancer | None) -> Balancer:
    """What every adapter does with its ``config=`` / ``balancer=`` arguments."""
    if balancer is not None and config is not None:
        raise TypeError("pass either config= or balancer=, not both")
    if balancer is not None:
        return balancer
    if config is None:
        raise TypeError("balancekit needs config= (a dict or a TOML path) or balancer=")
    return Balancer(config)


def _route_table(config: BalancerConfig) -> RouteTable:
    return RouteTable(route_from_config(r, config.pools) for r in config.routes)
