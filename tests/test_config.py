from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from balancekit import Balancer, ConfigError, load_config
from balancekit.asgi import BalanceMiddleware
from tests.helpers import app_fallback

ONE = {"backends": ["http://127.0.0.1:9001"]}


def test_defaults() -> None:
    config = load_config({"pools": {"api": ONE}})
    pool = config.pools["api"]
    assert config.store == "memory://"
    assert config.transport == "httptools"
    assert config.access_log is False
    assert config.trusted_proxies == ()
    assert (pool.timeouts.connect, pool.timeouts.read, pool.timeouts.write) == (5, 60, 60)
    assert (pool.retries.attempts, pool.retries.budget_percent) == (2, 20)
    assert pool.algorithm.name == "round_robin"
    assert pool.panic_threshold == 50
    assert pool.health_check.type == "none"
    assert config.status.enabled is False
    assert config.status.path == "/balancekit/"


def test_partial_tables_keep_other_defaults() -> None:
    pool = load_config({"pools": {"api": {**ONE, "timeouts": {"connect": 2}}}}).pools["api"]
    assert (pool.timeouts.connect, pool.timeouts.read) == (2, 60)


def test_backend_forms() -> None:
    pool = load_config(
        {
            "pools": {
                "api": {
                    "backends": [
                        "http://127.0.0.1:9001",
                        {"url": "http://127.0.0.1:9002", "weight": 3},
                        {"url": "http://127.0.0.1:9003", "backup": True},
                    ]
                }
            }
        }
    ).pools["api"]
    assert [(b.url, b.weight, b.backup) for b in pool.backends] == [
        ("http://127.0.0.1:9001", 1, False),
        ("http://127.0.0.1:9002", 3, False),
        ("http://127.0.0.1:9003", 1, True),
    ]


def test_toml_file(tmp_path: Path) -> None:
    path = tmp_path / "balancekit.toml"
    path.write_text(
        """
secret = ["new", "old"]
trusted_proxies = ["10.0.0.0/8"]

[pools.api]
algorithm = { name = "weighted_round_robin" }
backends = ["http://127.0.0.1:9001", { url = "http://127.0.0.1:9002", weight = 3 }]

[[routes]]
prefix = "/api/"
pool = "api"
strip_prefix = true
"""
    )
    balancer = Balancer(str(path))
    assert balancer.config.secrets == ["new", "old"]
    assert balancer.pools["api"].algorithm.name == "weighted_round_robin"
    assert balancer.route_for("/api/x") is not None
    assert Balancer(path).config == balancer.config


def test_a_balancer_config_is_accepted_as_is() -> None:
    config = load_config({"pools": {"api": ONE}})
    assert load_config(config) is config


def _pool(**pool: Any) -> dict[str, Any]:
    return {"pools": {"api": {**ONE, **pool}}}


@pytest.mark.parametrize(
    ("config", "message"),
    [
        pytest.param(
            {"pools": {"api": {"backends": ["http://a:1", {"url": "http://b:2", "weight": -3}]}}},
            "pools.api.backends[1].weight: must be a positive integer, got -3",
            id="negative-weight",
        ),
        pytest.param(
            {"pools": {"api": {"backends": [{"url": "http://b:2", "weight": "3"}]}}},
            "pools.api.backends[0].weight: must be an integer, got '3'",
            id="weight-string",
        ),
        pytest.param(
            {"pools": {"api": {"backends": ["ftp://b"]}}},
            "pools.api.backends[0].url: must be an http:// or https:// URL, got 'ftp://b'",
            id="url-scheme",
        ),
        pytest.param(
            {"pools": {"api": {"backends": ["http://a:1", "http://a:1"]}}},
            "pools.api.backends: lists 'http://a:1' twice",
            id="duplicate-backend",
        ),
        pytest.param(
            {"pools": {"api": {"backendz": []}}},
            "pools.api.backendz: unknown key; did you mean 'backends'?",
            id="unknown-pool-key",
        ),
        pytest.param(
            {"pols": {}},
            "pols: unknown key; did you mean 'pools'?",
            id="unknown-top-key",
        ),
        pytest.param(
            _pool(timeouts={"conect": 1}),
            "pools.api.timeouts.conect: unknown key; did you mean 'connect'?",
            id="unknown-timeout-key",
        ),
        pytest.param(
            _pool(timeouts={"read": 0}),
            "pools.api.timeouts.read: must be a positive number of seconds, got 0",
            id="zero-timeout",
        ),
        pytest.param(
            _pool(retries={"attempts": 0}),
            "pools.api.retries.attempts: must be a positive integer, got 0",
            id="zero-attempts",
        ),
        pytest.param(
            _pool(panic_threshold=150),
            "pools.api.panic_threshold: must be a percentage from 0 to 100, got 150",
            id="panic-percent",
        ),
        pytest.param(
            _pool(preserve_host="yes"),
            "pools.api.preserve_host: must be true or false, got 'yes'",
            id="bool",
        ),
        pytest.param(
            {"pools": {"api": ONE}, "routes": [{"prefix": "/x", "pool": "ap"}]},
            "routes[0].pool: unknown pool 'ap'; did you mean 'api'?",
            id="route-unknown-pool",
        ),
        pytest.param(
            {"pools": {"api": ONE}, "routes": [{"prefix": "x", "pool": "api"}]},
            "routes[0].prefix: must start with '/', got 'x'",
            id="route-prefix",
        ),
        pytest.param(
            {"pools": {"api": ONE}, "routes": [{"pool": "api"}]},
            "routes[0].prefix: is required",
            id="route-missing-prefix",
        ),
        pytest.param(
            {"trusted_proxies": ["10.0.0.0/8", "nonsense"]},
            "trusted_proxies: must be a list of CIDRs such as '10.0.0.0/8', got 'nonsense'",
            id="cidr",
        ),
        pytest.param(
            {"secret": 3},
            "secret: must be a string or a list, got 3",
            id="secret-type",
        ),
        pytest.param(
            {"transport": "curl"},
            "transport: must be one of 'aiohttp', 'httpx', 'httptools', got 'curl'",
            id="transport",
        ),
        pytest.param(
            _pool(persistence={"type": "cookie"}),
            "pools.api.persistence: cookie persistence signs its cookies:"
            " set the top-level 'secret'",
            id="cookie-needs-secret",
        ),
        pytest.param(
            _pool(algorithm="round_robbin"),
            "pools.api.algorithm: unknown algorithm 'round_robbin'; did you mean 'round_robin'?",
            id="unknown-algorithm",
        ),
        pytest.param(
            _pool(algorithm={"name": "round_robin", "kee": "ip"}),
            "pools.api.algorithm.kee: unknown key",
            id="algorithm-option",
        ),
        pytest.param(
            _pool(health_check={"type": "htp"}),
            "pools.api.health_check.type: unknown health check 'htp'; did you mean 'http'?",
            id="unknown-health-check",
        ),
        pytest.param(
            _pool(health_check={"type": "http", "pth": "/healthz"}),
            "pools.api.health_check.pth: unknown key; did you mean 'path'?",
            id="health-check-option",
        ),
        pytest.param(
            _pool(health_check={"type": "http", "expect_status": "abc"}),
            "pools.api.health_check.expect_status: must be status codes or ranges such as"
            " '200-399', got 'abc'",
            id="health-check-value",
        ),
        pytest.param(
            {"store": "nosuch://x"},
            "store: unknown store 'nosuch'",
            id="unknown-store",
        ),
    ],
)
def test_errors_name_the_key_path(config: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        Balancer(config)
    assert any(str(p).startswith(message) for p in info.value.problems), str(info.value)


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(
            {"pools": {"api": {"backends": [{"url": "http://a", "weight": 0}], "slow_start": -1}}}
        )
    paths = [p.path for p in info.value.problems]
    assert paths == ["pools.api.backends[0].weight", "pools.api.slow_start"]


@pytest.mark.parametrize(
    ("source", "message"),
    [
        pytest.param("/nonexistent/balancekit.toml", "no such configuration file", id="missing"),
        pytest.param(42, "configuration must be a dict", id="wrong-type"),
    ],
)
def test_bad_sources(source: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(source)


def test_invalid_toml(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[pools.api\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path)


def test_the_middleware_fails_at_construction_not_on_a_request() -> None:
    with pytest.raises(ConfigError, match=r"pools\.api\.backends\[0\]\.weight"):
        BalanceMiddleware(app_fallback, config=_pool(backends=[{"url": "http://a", "weight": 0}]))


def test_the_middleware_needs_config_or_balancer() -> None:
    with pytest.raises(TypeError, match="config="):
        BalanceMiddleware(app_fallback)
    with pytest.raises(TypeError, match="not both"):
        BalanceMiddleware(app_fallback, config={}, balancer=Balancer({}))
