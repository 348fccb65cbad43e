"""Balancer.reload: a new configuration served without a restart."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from balancekit import Balancer, ConfigError
from balancekit._request import RequestInfo


def config(backends: list[Any], **pool) -> dict:
    return {
        "pools": {"api": {"backends": backends, **pool}},
        "routes": [{"prefix": "/api/", "pool": "api"}],
    }


def test_unchanged_pool_keeps_live_state_and_follows_its_backends() -> None:
    balancer = Balancer(config(["http://10.0.0.1", "http://10.0.0.2"]))
    pool = balancer.pools["api"]
    kept = pool.backend("http://10.0.0.1")
    backend = pool.acquire(RequestInfo("GET", "/"))
    pool.release(backend, ok=True, latency_ms=5.0)
    pool.drain("http://10.0.0.1")
    balancer.reload(
        config(["http://10.0.0.1", {"url": "http://10.0.0.3", "weight": 4}])
        | {"routes": [{"prefix": "/v2/", "pool": "api"}]}
    )
    assert balancer.pools["api"] is pool
    assert pool.backend("http://10.0.0.1") is kept and kept.draining
    assert kept.requests_total == 1
    assert [b.url for b in pool.backends] == ["http://10.0.0.1", "http://10.0.0.3"]
    assert pool.backend("http://10.0.0.3").weight == 4
    assert balancer.route_for("/api/x") is None and balancer.route_for("/v2/x") is not None


def test_changed_settings_build_the_pool_anew_and_a_bad_config_changes_nothing() -> None:
    balancer = Balancer(config(["http://10.0.0.1"]))
    pool = balancer.pools["api"]
    balancer.reload(config(["http://10.0.0.1"], algorithm="least_connections"))
    assert balancer.pools["api"] is not pool
    assert balancer.pools["api"].algorithm.name == "least_connections"
    before = balancer.pools
    with pytest.raises(ConfigError, match=r"pools.api.backends\[0\].weight"):
        balancer.reload(config([{"url": "http://10.0.0.1", "weight": -1}]))
    with pytest.raises(ConfigError, match="store: cannot change without a restart"):
        balancer.reload({**config(["http://10.0.0.1"]), "store": "redis://127.0.0.1:6379/0"})
    assert balancer.pools is before


def test_health_checks_follow_a_reload(serve) -> None:
    from tests.upstreams import make_echo_app

    upstream = serve(make_echo_app("a"))
    checked = {"type": "http", "path": "/checked", "interval": 0.1}

    async def scenario() -> list[str]:
        balancer = Balancer(config([upstream.url]))
        await balancer.astart()
        balancer.reload(
            {
                "pools": {
                    "api": {"backends": [upstream.url]},
                    "new": {"backends": [upstream.url], "health_check": checked},
                },
                "routes": [],
            }
        )
        await asyncio.sleep(0.5)
        await balancer.aclose()
        return list(upstream.app.seen)

    seen = asyncio.run(scenario())
    assert seen.count("/checked") >= 2


def test_a_reload_still_restarting_checks_at_close_starts_none_after_it(serve) -> None:
    # SIGHUP, then SIGTERM before the reload's checks have restarted (what
    # a supervisor's workers can get while starting): the restart must not
    # start checks in a balancer already closed, or they outlive it (and
    # hang the event loop's end if one swallows its cancellation).
    from tests.upstreams import make_echo_app

    upstream = serve(make_echo_app("a"))
    checked = {"type": "http", "path": "/checked", "interval": 0.1}

    async def scenario() -> list[asyncio.Task[Any]]:
        balancer = Balancer(config([upstream.url], health_check=checked))
        await balancer.astart()
        await asyncio.sleep(0.05)
        balancer.reload(config([upstream.url], health_check={**checked, "interval": 0.2}))
        for _ in range(10):  # the restart's task is made on a coming loop turn
            await asyncio.sleep(0)
            if [t for t in asyncio.all_tasks() if "_restart_checks" in repr(t.get_coro())]:
                break
        else:
            raise AssertionError("the reload restarted no checks")
        await asyncio.sleep(0)  # the restart runs up to its wait for the old checks to stop
        await balancer.aclose()
        await asyncio.sleep(0.3)  # the restart, if it went on, has started its checks
        left = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in left:
            task.cancel()
        return left

    assert asyncio.run(scenario()) == []
