"""Routing beyond a prefix (CONTRACT section 10): host, methods and headers,
the precedence among routes that all match, weighted splits with a stable
key, rewrites and per-route terms.

Precedence and splits are decided without I/O by ``Balancer.classify``,
so they are tested through it; what the adapters hand it (Host, method,
headers) and what reaches the upstream is tested end to end on every engine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from balancekit import Balancer, ConfigError
from balancekit._classify import Routed
from balancekit._routing import HOST_CACHE_SIZE
from tests.conftest import ENGINES
from tests.helpers import balanced
from tests.upstreams import make_echo_app

POOL_NAMES = ("a", "b", "c", "d", "e")
HOST = (b"host", b"balancekit.test")


def pools(*names: str) -> dict[str, Any]:
    """Pools that are never contacted: classifying does no I/O."""
    return {
        name: {"backends": [f"http://127.0.0.1:{9000 + i}"]}
        for i, name in enumerate(names or POOL_NAMES)
    }


def router(*routes: dict[str, Any]) -> Balancer:
    return Balancer({"pools": pools(), "routes": list(routes)})


def pool_for(
    balancer: Balancer,
    path: str,
    *,
    host: str = "balancekit.test",
    method: str = "GET",
    headers: dict[str, str] | None = None,
) -> str | None:
    """The pool a request lands in, or None when it is not routed."""
    raw = [(b"host", host.encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    verdict = balancer.classify(method, path, raw)
    return verdict.pool.name if isinstance(verdict, Routed) else None


# --- host ------------------------------------------------------------------------


def test_an_exact_host_beats_a_wildcard_which_beats_no_host() -> None:
    balancer = router(
        {"prefix": "/", "pool": "a"},
        {"prefix": "/", "pool": "b", "host": "*.example.com"},
        {"prefix": "/", "pool": "c", "host": "api.example.com"},
        {"prefix": "/", "pool": "d", "host": "*.eu.example.com"},
    )
    assert pool_for(balancer, "/x", host="api.example.com") == "c"
    assert pool_for(balancer, "/x", host="www.example.com") == "b"
    assert pool_for(balancer, "/x", host="a.b.example.com") == "b"  # one or more labels
    assert pool_for(balancer, "/x", host="api.eu.example.com") == "d"  # the longer suffix
    assert pool_for(balancer, "/x", host="example.com") == "a"  # the wildcard needs a label
    assert pool_for(balancer, "/x", host="badexample.com") == "a"
    assert pool_for(balancer, "/x", host="other.org") == "a"
    # HTTP/1.0 may leave Host out (1.1 is refused without it: RFC 9112 3.2).
    verdict = balancer.classify("GET", "/x", [], http_version="1.0")
    assert isinstance(verdict, Routed) and verdict.pool.name == "a"


@pytest.mark.parametrize(
    "host",
    [
        "api.example.com",
        "API.Example.COM",
        "api.example.com:8443",
        "api.example.com.",
        " api.example.com",
    ],
)
def test_the_host_is_matched_without_port_case_or_trailing_dot(host: str) -> None:
    balancer = router(
        {"prefix": "/", "pool": "a"}, {"prefix": "/", "pool": "b", "host": "api.example.com"}
    )
    assert pool_for(balancer, "/", host=host) == "b"


def test_a_route_with_a_host_beats_a_longer_prefix_without_one() -> None:
    balancer = router(
        {"prefix": "/api/users/", "pool": "a"},
        {"prefix": "/", "pool": "b", "host": "shop.example.com"},
    )
    assert pool_for(balancer, "/api/users/1", host="shop.example.com") == "b"
    assert pool_for(balancer, "/api/users/1", host="other.example.com") == "a"


def test_a_host_whose_routes_do_not_cover_the_path_falls_back_to_the_others() -> None:
    balancer = router(
        {"prefix": "/", "pool": "a"},
        {"prefix": "/admin/", "pool": "b", "host": "*.example.com"},
        {"prefix": "/api/", "pool": "c", "host": "api.example.com"},
    )
    assert pool_for(balancer, "/api/x", host="api.example.com") == "c"
    assert pool_for(balancer, "/admin/x", host="api.example.com") == "b"
    assert pool_for(balancer, "/other", host="api.example.com") == "a"


def test_the_host_cache_stays_bounded_and_right_after_it_is_emptied() -> None:
    balancer = router(
        {"prefix": "/", "pool": "a"}, {"prefix": "/", "pool": "b", "host": "*.example.com"}
    )
    table = balancer.routes
    for i in range(HOST_CACHE_SIZE + 50):
        expected = "b" if i % 2 else "a"
        host = f"h{i}.example.com" if i % 2 else f"h{i}.example.org"
        assert pool_for(balancer, "/", host=host) == expected
        assert len(table._by_host) <= HOST_CACHE_SIZE
    assert pool_for(balancer, "/", host="h1.example.com") == "b"


# --- methods and headers -----------------------------------------------------------


def test_methods_and_headers_beat_a_route_without_conditions_on_the_same_prefix() -> None:
    balancer = router(
        {"prefix": "/api/", "pool": "a"},
        {"prefix": "/api/", "pool": "b", "methods": ["POST", "PUT"]},
        {"prefix": "/api/", "pool": "c", "headers": {"X-Canary": "1"}},
        {"prefix": "/api/", "pool": "d", "headers": {"X-Debug": "*"}},
    )
    assert pool_for(balancer, "/api/x") == "a"
    assert pool_for(balancer, "/api/x", method="POST") == "b"
    assert pool_for(balancer, "/api/x", method="post") == "a"  # methods are case-sensitive
    assert pool_for(balancer, "/api/x", headers={"X-Canary": "1"}) == "c"
    assert pool_for(balancer, "/api/x", headers={"x-canary": "1"}) == "c"  # names are not
    assert pool_for(balancer, "/api/x", headers={"X-Canary": "2"}) == "a"
    assert pool_for(balancer, "/api/x", headers={"X-Debug": ""}) == "d"  # "*": present
    # Two conditional routes both match: the first in the configuration wins.
    assert pool_for(balancer, "/api/x", method="PUT", headers={"X-Canary": "1"}) == "b"


def test_every_header_of_a_route_must_hold() -> None:
    balancer = router(
        {"prefix": "/", "pool": "a"},
        {"prefix": "/", "pool": "b", "headers": {"X-Team": "pay", "X-Canary": "1"}},
    )
    assert pool_for(balancer, "/", headers={"X-Team": "pay"}) == "a"
    assert pool_for(balancer, "/", headers={"X-Team": "pay", "X-Canary": "1"}) == "b"


def test_a_longer_prefix_beats_a_conditional_route_on_a_shorter_one() -> None:
    balancer = router(
        {"prefix": "/api/", "pool": "a", "methods": ["GET"]},
        {"prefix": "/api/v2/", "pool": "b"},
    )
    assert pool_for(balancer, "/api/v2/x") == "b"
    assert pool_for(balancer, "/api/v1/x") == "a"
    assert pool_for(balancer, "/api/v1/x", method="DELETE") is None  # not ours: the app's


def test_among_equal_routes_the_first_in_the_configuration_wins() -> None:
    balancer = router(
        {"prefix": "/x/", "pool": "a", "host": "h.example.com"},
        {"prefix": "/x/", "pool": "b", "host": "h.example.com"},
    )
    assert pool_for(balancer, "/x/1", host="h.example.com") == "a"


# --- split -----------------------------------------------------------------------------


def split_router(**route: Any) -> Balancer:
    return router({"prefix": "/", "split": {"a": 90, "b": 10}, **route})


def test_a_split_without_a_key_sends_each_request_by_its_percentage() -> None:
    balancer = split_router()
    counts = Counter(pool_for(balancer, "/") for _ in range(2000))
    # 2000 draws at 10%: mean 200, standard deviation 13.4; 5 of them either side.
    assert 133 <= counts["b"] <= 267
    assert counts["a"] + counts["b"] == 2000


def test_a_split_key_keeps_each_key_on_one_side() -> None:
    balancer = split_router(split_key="cookie:uid")
    sides = {}
    for uid in range(400):
        cookie = {"Cookie": f"theme=dark; uid={uid}"}
        seen = {pool_for(balancer, "/", headers=cookie) for _ in range(5)}
        assert len(seen) == 1
        sides[uid] = seen.pop()
    share = sum(side == "b" for side in sides.values()) / len(sides)
    assert 0.04 <= share <= 0.18  # 10% of keys, give or take (sd 1.5%)
    # Without the key, requests are split at random rather than all on one side.
    assert {pool_for(balancer, "/") for _ in range(200)} == {"a", "b"}


@pytest.mark.parametrize(
    ("split_key", "header"),
    [("header:X-User", "X-User"), ("query:u", None), ("ip", None)],
)
def test_every_split_key_form_reads_its_key(split_key: str, header: str | None) -> None:
    balancer = router({"prefix": "/", "split": {"a": 50, "b": 50}, "split_key": split_key})
    seen = set()
    for key in range(100):
        raw, query, client_ip = [HOST], "", ""
        if header is not None:
            raw.append((header.lower().encode(), str(key).encode()))
        elif split_key == "ip":
            client_ip = f"10.0.0.{key}"
        else:
            query = f"u={key}"
        sides = set()
        for _ in range(3):
            verdict = balancer.classify("GET", "/", raw, query=query, client_ip=client_ip)
            assert isinstance(verdict, Routed)
            sides.add(verdict.pool.name)
        assert len(sides) == 1
        seen |= sides
    assert seen == {"a", "b"}


SIDES_SCRIPT = """
import json, sys
from balancekit import Balancer
config, keys = json.loads(sys.argv[1]), json.loads(sys.argv[2])
balancer = Balancer(config)
print(json.dumps([
    balancer.classify("GET", "/", [(b"host", b"t"), (b"cookie", f"uid={key}".encode())]).pool.name
    for key in keys
]))
"""


def test_a_key_lands_on_the_same_side_in_every_process() -> None:
    config = {
        "pools": pools("a", "b"),
        "routes": [{"prefix": "/", "split": {"a": 70, "b": 30}, "split_key": "cookie:uid"}],
    }
    keys = [f"user-{i}" for i in range(300)]
    answers = []
    for seed in ("1", "4242"):  # str hashes differ between the two processes
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run(
            [sys.executable, "-c", SIDES_SCRIPT, json.dumps(config), json.dumps(keys)],
            capture_output=True,
            text=True,
            check=True,
            env=env,
            timeout=60,
        ).stdout
        answers.append(json.loads(out))
    assert answers[0] == answers[1]
    assert set(answers[0]) == {"a", "b"}


def test_a_pool_at_zero_percent_gets_nothing() -> None:
    balancer = router({"prefix": "/", "split": {"a": 100, "b": 0}})
    assert {pool_for(balancer, "/") for _ in range(300)} == {"a"}


# --- configuration errors ---------------------------------------------------------


@pytest.mark.parametrize(
    ("route", "message"),
    [
        ({"split": {"a": 90, "b": 5}}, "routes[1].split: percentages add up to 95, not 100"),
        (
            {"pool": "a", "rewrite": "/v2/", "strip_prefix": True},
            "routes[1].rewrite: excludes 'strip_prefix'",
        ),
        (
            {"pool": "a", "methods": ["get"]},
            "routes[1].methods: unknown method 'get'; did you mean 'GET'?",
        ),
        ({"pool": "a", "split": {"a": 100}}, "routes[1]: needs exactly one of 'pool' and 'split'"),
        ({}, "routes[1]: needs exactly one of 'pool' and 'split'"),
        ({"split": {"a": 50, "zz": 50}}, "routes[1].split.zz: unknown pool 'zz'"),
        ({"pool": "zz"}, "routes[1].pool: unknown pool 'zz'"),
        (
            {"pool": "a", "host": "api.example.com:80"},
            "routes[1].host: must be a host name without a port",
        ),
        ({"pool": "a", "host": "*"}, "routes[1].host: must be a host name"),
        ({"pool": "a", "split_key": "body"}, "routes[1].split_key: must be 'ip', 'header:NAME'"),
        (
            {"pool": "a", "headers": {"X Bad": "1"}},
            "routes[1].headers: 'X Bad' is not a header name",
        ),
        (
            {"pool": "a", "timeouts": {"reed": 1}},
            "routes[1].timeouts.reed: unknown key; did you mean 'read'?",
        ),
        (
            {"pool": "a", "retries": {"on_status": [99]}},
            "routes[1].retries.on_status: must list statuses",
        ),
    ],
)
def test_a_bad_route_fails_at_start_up_with_its_key_path(
    route: dict[str, Any], message: str
) -> None:
    config = {
        "pools": pools(),
        "routes": [{"prefix": "/ok/", "pool": "a"}, {"prefix": "/", **route}],
    }
    with pytest.raises(ConfigError) as caught:
        Balancer(config)
    assert any(str(problem).startswith(message) for problem in caught.value.problems), caught.value


# --- end to end on every engine -------------------------------------------------------


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def routed_server(serve: Callable[..., Any], engine: str, routes: list[dict[str, Any]]) -> Any:
    """A balancer with pools a, b and c (one echo upstream each) on ``engine``."""
    named = {name: serve(make_echo_app(name)) for name in ("a", "b", "c")}
    server, _ = balanced(
        serve,
        [],
        engine=engine,
        pools={name: {"backends": [upstream.url]} for name, upstream in named.items()},
        routes=routes,
    )
    return server


def test_host_method_header_and_rewrite_reach_the_upstream(serve, engine) -> None:
    server = routed_server(
        serve,
        engine,
        [
            {"prefix": "/api/", "pool": "a", "rewrite": "/v2/"},
            {"prefix": "/api/", "pool": "b", "headers": {"X-Canary": "1"}},
            {"prefix": "/", "pool": "c", "host": "*.shop.test", "methods": ["GET", "POST"]},
        ],
    )

    def get(path: str, method: str = "GET", **headers: str) -> tuple[str, str]:
        response = httpx.request(method, server.url + path, headers=headers, timeout=10)
        assert response.status_code == 200, response.text
        body = response.json()
        return body.get("backend", "app"), body.get("raw_path", "")

    assert get("/api/users?x=1") == ("a", "/v2/users")
    assert get("/api/users", **{"X-Canary": "1"}) == ("b", "/api/users")
    assert get("/api/users", Host="www.shop.test:8080") == ("c", "/api/users")
    assert get("/api/users", "POST", Host="WWW.SHOP.TEST") == ("c", "/api/users")
    assert get("/api/users", "DELETE", Host="www.shop.test") == ("a", "/v2/users")


def test_a_route_with_its_own_timeouts_overrides_the_pools(serve, engine) -> None:
    server = routed_server(
        serve,
        engine,
        [
            {"prefix": "/slow/", "pool": "a", "strip_prefix": True},
            {"prefix": "/quick/", "pool": "a", "strip_prefix": True, "timeouts": {"read": 0.2}},
        ],
    )
    assert httpx.get(f"{server.url}/slow/sleep?s=0.5", timeout=10).status_code == 200
    assert httpx.get(f"{server.url}/quick/sleep?s=0.5", timeout=10).status_code == 504
