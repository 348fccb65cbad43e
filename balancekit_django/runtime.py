"""The balancer of this process, kept in step with settings and the database.

One :class:`Runtime` per process (a forked worker makes its own). It is
built from ``settings.BALANCEKIT`` at once, so a bad setting fails at
start-up; the database's pools join on the first request, and a watcher
thread polls the version row every ``POLL_INTERVAL`` seconds, reloading
when it moved. A database that cannot be reached leaves the last good
configuration serving.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from django.conf import settings
from django.db import close_old_connections

from balancekit import Balancer, BalancerConfig, ConfigError
from balancekit.adapter import toward_flags, with_default_secret

logger = logging.getLogger("balancekit")

#: Seconds between two looks at the version row (one cheap query).
POLL_INTERVAL = float(getattr(settings, "BALANCEKIT_POLL_INTERVAL", 2.0))


def settings_config() -> dict[str, Any]:
    """``settings.BALANCEKIT`` as a dict, ``secret`` defaulting to SECRET_KEY."""
    source = getattr(settings, "BALANCEKIT", None) or {}
    config = with_default_secret(source, getattr(settings, "SECRET_KEY", None))
    if isinstance(config, BalancerConfig):
        return config.model_dump(exclude_none=True)
    return dict(config)


def database_config() -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, dict[str, bool]]]:
    """The database's pools and routes as configuration, and each backend's
    enabled/draining flags by pool and URL."""
    from .models import Pool, Route

    pools: dict[str, Any] = {}
    states: dict[str, dict[str, bool]] = {}
    for pool in Pool.objects.prefetch_related("backends"):
        backends = list(pool.backends.all())
        pools[pool.name] = pool.as_config(
            [{"url": b.url, "weight": b.weight, "backup": b.backup} for b in backends]
        )
        for b in backends:
            states[f"{pool.name} {b.url}"] = {"enabled": b.enabled, "draining": b.draining}
    routes = [route.as_config() for route in Route.objects.select_related("pool")]
    return pools, routes, states


def compose(
    base: dict[str, Any], pools: dict[str, Any], routes: list[dict[str, Any]]
) -> dict[str, Any]:
    """Settings and database side by side; a pool in both stays the settings' one
    (``manage.py check`` reports the clash)."""
    clashes = sorted(pools.keys() & base.get("pools", {}).keys())
    if clashes:
        logger.error("balancekit: pools %s are in BALANCEKIT and in the database", clashes)
    merged_pools = {**{k: v for k, v in pools.items() if k not in clashes}, **base.get("pools", {})}
    # A database route to a pool that clashes would reach the settings' one.
    served = [r for r in routes if not _named_pools(r) & set(clashes)]
    merged_routes = [*base.get("routes", []), *served]
    return {**base, "pools": merged_pools, "routes": merged_routes}


def _named_pools(route: dict[str, Any]) -> set[str]:
    """The pools a route's table sends to (``pool``, or each of ``split``)."""
    split = route.get("split")
    names = set(split) if isinstance(split, dict) else set()
    return names | ({route["pool"]} if "pool" in route else set())


class Runtime:
    def __init__(self) -> None:
        self.base = settings_config()
        self.balancer = Balancer(self.base)
        self.version: int | None = None
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._failing = False

    def start(self) -> None:
        """Load the database's pools and watch them (once per process)."""
        if self._thread is not None:
            return
        with self._lock:
            if self._thread is not None:  # another thread was quicker
                return  # type: ignore[unreachable]
            self.refresh()
            self._thread = threading.Thread(
                target=self._watch, name="balancekit-django", daemon=True
            )
            self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(POLL_INTERVAL):
            try:
                self.refresh()
            except Exception:  # a bug here must not stop the watching
                logger.exception("balancekit: reloading the database's pools failed")

    def refresh(self) -> bool:
        """Reload if the version row moved; whether it did."""
        from .models import State

        try:
            close_old_connections()
            version = State.objects.values_list("version", flat=True).first() or 0
            if version == self.version:
                return False
            pools, routes, states = database_config()
        except Exception as exc:  # the database is away: keep serving what we have
            if not self._failing:
                self._failing = True
                logger.error(
                    "balancekit: cannot read pools from the database (%s); keeping the last ones",
                    exc,
                )
            return False
        if self._failing:
            self._failing = False
            logger.warning("balancekit: database reachable again")
        try:
            self.balancer.reload(compose(self.base, pools, routes))
        except ConfigError as exc:
            logger.error(
                "balancekit: the database's pools are not valid, keeping the last good ones:\n%s",
                exc,
            )
            self.version = version
            return False
        for key, flags in states.items():
            name, url = key.split(" ", 1)
            pool = self.balancer.pools[name]
            backend = pool.find(url)
            if backend is None:
                continue
            # Not announced: every process reads the same rows.
            for change in toward_flags(backend, **flags):
                pool.apply(change)
        self.version = version
        return True

    def stop(self) -> None:
        self._stop.set()


_runtime: Runtime | None = None
_runtime_lock = threading.Lock()


def current() -> Runtime:
    """This process's runtime (built on first use)."""
    global _runtime
    runtime = _runtime
    if runtime is None:
        with _runtime_lock:
            runtime = _runtime
            if runtime is None:
                runtime = _runtime = Runtime()
    return runtime


def _forget_after_fork() -> None:
    global _runtime, _runtime_lock
    if _runtime is not None:  # keep the validated balancer, not its thread
        _runtime._thread = None
        _runtime._lock = threading.Lock()
        _runtime._stop = threading.Event()
    _runtime_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_after_fork)
