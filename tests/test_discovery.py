"""Discovery: backends that come and go, from a file or from DNS.

Everything runs for real: uvicorn upstreams, the ASGI middleware under
uvicorn in front of them, a file the test rewrites, and (for ``dns``) a
dnsmasq on 127.0.0.1 whose records the test changes while it runs.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from balancekit import Balancer, ConfigError, hookimpl
from balancekit._plugins import make_plugin_manager
from balancekit.asgi import BalanceMiddleware
from balancekit.discovery import FileDiscovery
from balancekit.discovery._runner import DiscoveryRunner, parse_answer
from balancekit.testing import DiscoveryCheckFailed, check_discovery
from tests.conftest import ServerThread
from tests.helpers import app_fallback
from tests.upstreams import make_echo_app

# --- helpers -------------------------------------------------------------------------


def wait_for(condition: Callable[[], Any], timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what or condition}"
        time.sleep(0.05)


def front(
    serve: Callable[..., ServerThread],
    backends: list[str],
    discovery: dict[str, Any],
    *,
    plugin_manager: Any = None,
    **pool: Any,
) -> tuple[ServerThread, Balancer]:
    """The ASGI middleware under uvicorn, pool ``api`` on ``/api/``."""
    config = {
        "pools": {"api": {"backends": backends, "discovery": discovery, **pool}},
        "routes": [{"prefix": "/api/", "pool": "api", "strip_prefix": True}],
    }
    balancer = Balancer(config, plugin_manager=plugin_manager)
    server = serve(BalanceMiddleware(app_fallback, balancer=balancer))
    return server, balancer


def hits(server: ServerThread, count: int = 30) -> Counter[str]:
    """Which upstreams answered ``count`` requests (none may fail)."""
    seen: Counter[str] = Counter()
    with httpx.Client(base_url=server.url, timeout=10) as client:
        for _ in range(count):
            response = client.get("/api/x")
            assert response.status_code == 200, response.text
            seen[response.headers["x-upstream"]] += 1
    return seen


def urls(balancer: Balancer) -> dict[str, str]:
    """The pool's backends: URL to source."""
    return {b["url"]: b["source"] for b in balancer.status()["pools"]["api"]["backends"]}


def write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def toml_list(*entries: str) -> str:
    return "backends = [\n" + "".join(f"  {entry},\n" for entry in entries) + "]\n"


@pytest.fixture
def named(serve: Callable[..., ServerThread]) -> dict[str, ServerThread]:
    """Echo upstreams a to d, by name."""
    return {name: serve(make_echo_app(name)) for name in "abcd"}


# --- the file provider ------------------------------------------------------------------


def test_file_rename_into_place_and_a_truncated_write(serve, named, tmp_path, caplog) -> None:
    caplog.set_level(logging.INFO, "balancekit")
    a, b, c = named["a"], named["b"], named["c"]
    listing = tmp_path / "backends.toml"
    listing.write_text(toml_list(f'"{b.url}"'))
    server, balancer = front(serve, [a.url], {"type": "file", "path": str(listing), "interval": 1})
    wait_for(lambda: set(hits(server, 6)) == {"a", "b"}, what="b from the file")
    assert urls(balancer) == {a.url: "config", b.url: "discovery"}

    write_atomically(listing, toml_list(f'"{b.url}"', f'{{ url = "{c.url}", weight = 2 }}'))
    wait_for(lambda: c.url in urls(balancer), what="c after the rename")
    assert set(hits(server, 8)) == {"a", "b", "c"}

    # A half-written file (truncated in the middle of a table) is malformed:
    # the pool keeps b and c until the file is whole again.
    whole = toml_list(f'"{c.url}"', f'"{named["d"].url}"')
    listing.write_text(whole[: whole.index(named["d"].url) + 5])
    wait_for(lambda: balancer.status()["pools"]["api"]["discovery"]["failing"], what="failing")
    assert set(urls(balancer)) == {a.url, b.url, c.url}
    assert set(hits(server, 9)) == {"a", "b", "c"}
    failures = [r for r in caplog.records if "failed" in r.getMessage()]
    assert len(failures) == 1 and str(listing) in failures[0].getMessage()
    assert failures[0].levelno == logging.WARNING

    listing.write_text(whole)
    wait_for(lambda: set(urls(balancer)) == {a.url, c.url, named["d"].url}, what="the whole file")
    assert set(hits(server, 9)) == {"a", "c", "d"}
    status = balancer.status()["pools"]["api"]["discovery"]
    assert status["type"] == "file" and not status["failing"]
    assert status["backends"] == [c.url, named["d"].url]
    assert "not valid TOML" in status["last_error"] and status["last_ok"] > 0
    assert any("answers again" in r.getMessage() for r in caplog.records)


def test_a_removed_backend_drains_its_request_in_flight(serve, named, tmp_path) -> None:
    b, c = named["b"], named["c"]
    listing = tmp_path / "backends.json"
    listing.write_text(json.dumps({"backends": [b.url]}))
    server, balancer = front(serve, [], {"type": "file", "path": str(listing), "interval": 1})
    wait_for(lambda: b.url in urls(balancer), what="b")
    with ThreadPoolExecutor(1) as pool, httpx.Client(base_url=server.url, timeout=10) as client:
        slow = pool.submit(client.get, "/api/sleep", params={"s": "2.5"})
        wait_for(lambda: balancer.pools["api"].backend(b.url).active_requests == 1, what="busy")
        write_atomically(listing, json.dumps({"backends": [c.url]}))
        wait_for(lambda: c.url in urls(balancer), what="c")
        backend = balancer.pools["api"].find(b.url)
        assert backend is not None and backend.state.value == "draining"
        assert set(hits(server, 5)) == {"c"}  # nothing new for b
        response = slow.result()
    assert response.status_code == 200 and response.text == "b"
    wait_for(lambda: b.url not in urls(balancer), timeout=3, what="b removed once idle")


def test_weight_changes_in_place_and_static_backends_stay(serve, named, tmp_path) -> None:
    a, b, c = named["a"], named["b"], named["c"]
    listing = tmp_path / "backends.toml"
    listing.write_text(toml_list(f'"{b.url}"', f'"{c.url}"'))
    server, balancer = front(
        serve,
        [a.url],
        {"type": "file", "path": str(listing), "interval": 1},
        algorithm="weighted_round_robin",
    )
    wait_for(lambda: len(urls(balancer)) == 3, what="b and c")
    hits(server, 6)
    pool = balancer.pools["api"]
    before = pool.backend(b.url)
    served = before.requests_total
    assert served > 0
    listing.write_text(toml_list(f'{{ url = "{b.url}", weight = 5 }}', f'"{c.url}"'))
    wait_for(lambda: pool.backend(b.url).weight == 5, what="weight 5")
    assert pool.backend(b.url) is before and before.requests_total >= served  # live state kept
    seen = hits(server, 28)
    assert seen["b"] >= 18 and seen["a"] >= 2 and seen["c"] >= 2, seen  # 5:1:1

    # An empty list empties the discovered part; the static backend stays.
    listing.write_text("backends = []\n")
    wait_for(lambda: urls(balancer) == {a.url: "config"}, what="only a")
    assert set(hits(server, 4)) == {"a"}
    assert balancer.status()["pools"]["api"]["discovery"]["backends"] == []


def test_a_bad_entry_is_left_out_and_the_rest_applied(serve, named, tmp_path, caplog) -> None:
    b = named["b"]
    listing = tmp_path / "backends.toml"
    listing.write_text(
        toml_list('"ftp://nope"', f'"{b.url}"', '{ url = "http://x:1", weight = 0 }')
    )
    server, balancer = front(serve, [], {"type": "file", "path": str(listing), "interval": 1})
    wait_for(lambda: b.url in urls(balancer), what="b")
    assert set(urls(balancer)) == {b.url}
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "'ftp://nope'" in logged and str(listing) in logged and "weight" in logged


def test_a_discovered_backend_waits_for_its_first_passing_check(named) -> None:
    balancer = Balancer(
        {
            "pools": {
                "api": {
                    "backends": [named["a"].url],
                    "health_check": {"type": "http", "path": "/", "interval": 30},
                    "discovery": {"type": "file", "path": "unused.toml"},
                }
            }
        }
    )
    pool = balancer.pools["api"]
    runner = DiscoveryRunner(pool, FileDiscovery(path="unused.toml"), type_name="file", interval=30)
    wanted, bad = parse_answer([named["b"].url])
    runner.apply(wanted)
    assert not bad
    added = pool.backend(named["b"].url)
    assert added.state.value == "unhealthy" and added.source == "discovery"
    assert pool.backend(named["a"].url).state.value == "healthy"


def test_a_reload_keeps_the_discovered_backends(serve, named, tmp_path) -> None:
    a, b = named["a"], named["b"]
    listing = tmp_path / "backends.toml"
    listing.write_text(toml_list(f'"{b.url}"'))
    config: dict[str, Any] = {
        "pools": {
            "api": {
                "backends": [a.url],
                "discovery": {"type": "file", "path": str(listing), "interval": 1},
            }
        },
        "routes": [{"prefix": "/api/", "pool": "api", "strip_prefix": True}],
    }
    server, balancer = front(serve, [a.url], config["pools"]["api"]["discovery"])
    wait_for(lambda: b.url in urls(balancer), what="b")
    balancer.reload(config)
    assert urls(balancer) == {a.url: "config", b.url: "discovery"}


def test_a_relative_path_is_beside_the_toml_file(tmp_path) -> None:
    (tmp_path / "balancekit.toml").write_text(
        '[pools.api.discovery]\ntype = "file"\npath = "backends.toml"\n'
    )
    balancer = Balancer(tmp_path / "balancekit.toml")
    discovery = balancer.config.pools["api"].discovery
    assert discovery is not None
    assert discovery.options["path"] == str(tmp_path / "backends.toml")


# --- the plugin hook ------------------------------------------------------------------------


class Listed:
    """A tiny discovery plugin: the URLs it was given, then fewer."""

    name = "listed"

    def __init__(self, *, urls: list[str], interval: float = 1.0) -> None:
        self.urls = urls
        self.interval = interval
        self.calls = 0

    async def resolve(self) -> list[Any]:
        self.calls += 1
        return [{"url": url, "weight": 2} for url in self.urls]


class ListedPlugin:
    @hookimpl
    def balancekit_register_discovery(self) -> list[type[Any]]:
        return [Listed]


def test_a_plugin_registered_through_the_hook_serves_a_pool(serve, named) -> None:
    manager = make_plugin_manager(entry_points=False)
    manager.pm.register(ListedPlugin(), name="listed-plugin")
    assert "listed" in manager.classes("discovery")
    b = named["b"]
    server, balancer = front(serve, [], {"type": "listed", "urls": [b.url]}, plugin_manager=manager)
    wait_for(lambda: b.url in urls(balancer), what="b")
    assert hits(server, 3) == Counter({"b": 3})
    assert balancer.pools["api"].backend(b.url).weight == 2
    assert balancer.status()["pools"]["api"]["discovery"]["type"] == "listed"


PLUGIN_MODULE = """
from balancekit import hookimpl


class Listed:
    name = "listed"

    def __init__(self, *, urls):
        self.urls = urls

    async def resolve(self):
        return list(self.urls)


@hookimpl
def balancekit_register_discovery():
    return [Listed]
"""


def test_plugins_command_lists_discovery(tmp_path) -> None:
    (tmp_path / "bk_listed_plugin.py").write_text(PLUGIN_MODULE)
    info = tmp_path / "bk_listed-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: bk-listed\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[balancekit]\nlisted = bk_listed_plugin\n")
    result = subprocess.run(
        [sys.executable, "-m", "balancekit", "plugins"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines()]
    assert ["discovery", "listed", "bk-listed", "1.0"] in rows
    assert ["discovery", "file", "balancekit"] in rows


def test_the_kit_passes_the_builtin_file_provider(tmp_path) -> None:
    listing = tmp_path / "backends.json"
    listing.write_text(json.dumps({"backends": ["http://10.0.0.1:80"]}))
    check_discovery(FileDiscovery, path=str(listing))
    check_discovery(Listed, urls=["http://10.0.0.1:80"])


class Sync:
    name = "sync"

    def resolve(self) -> list[str]:
        return []


class Garbage:
    name = "garbage"

    async def resolve(self) -> Any:
        return ["not a url", 3]


class NotAList:
    async def resolve(self) -> Any:
        return {"url": "http://a:1"}


@pytest.mark.parametrize(
    ("cls", "options", "message"),
    [
        pytest.param(Sync, {}, "async def resolve", id="sync-resolve"),
        pytest.param(Garbage, {}, "bad entry [1] 3", id="bad-entries"),
        pytest.param(NotAList, {}, "needs a class attribute 'name'", id="no-name"),
        pytest.param(NotAList, {}, "must return a list", id="not-a-list"),
        pytest.param(Listed, {"urls": [], "speed": 1}, "no option 'speed'", id="unknown-option"),
        pytest.param(FileDiscovery, {"path": "/nonexistent.toml"}, "raised", id="raises"),
    ],
)
def test_the_kit_explains_what_is_wrong(cls, options, message) -> None:
    with pytest.raises(DiscoveryCheckFailed) as info:
        check_discovery(cls, **options)
    assert message in str(info.value)


# --- bad input ---------------------------------------------------------------------------


def _pool_with(discovery: Any) -> dict[str, Any]:
    return {"pools": {"api": {"backends": [], "discovery": discovery}}}


@pytest.mark.parametrize(
    ("discovery", "path", "message"),
    [
        pytest.param(
            {"type": "consul"}, "pools.api.discovery.type", "unknown discovery", id="type"
        ),
        pytest.param({"type": "file"}, "pools.api.discovery.path", "is required", id="no-path"),
        pytest.param(
            {"type": "file", "path": "x.yaml"}, "pools.api.discovery.path", ".toml", id="yaml"
        ),
        pytest.param(
            {"type": "file", "path": "x.toml", "paht": 1},
            "pools.api.discovery.paht",
            "did you mean 'path'",
            id="unknown-key",
        ),
        pytest.param(
            {"type": "file", "path": "x.toml", "interval": 0},
            "pools.api.discovery.interval",
            "",
            id="interval",
        ),
        pytest.param({"interval": 3}, "pools.api.discovery.type", "", id="no-type"),
    ],
)
def test_bad_discovery_tables_are_config_errors(discovery, path, message) -> None:
    with pytest.raises(ConfigError) as info:
        Balancer(_pool_with(discovery))
    assert any(p.path == path and message in p.message for p in info.value.problems), str(
        info.value
    )


async def test_a_plugin_that_raises_keeps_the_last_good_set_and_backs_off() -> None:
    class Flaky:
        name = "flaky"

        def __init__(self) -> None:
            self.fail = False

        async def resolve(self) -> list[str]:
            if self.fail:
                raise OSError("resolver unreachable")
            return ["http://10.0.0.1:80"]

    balancer = Balancer({"pools": {"api": {"backends": ["http://10.0.0.9:80"]}}})
    pool = balancer.pools["api"]
    plugin = Flaky()
    runner = DiscoveryRunner(pool, plugin, type_name="flaky", interval=8)
    assert await runner.round() == 8
    plugin.fail = True
    delays = [await runner.round() for _ in range(5)]
    assert delays == [1.0, 2.0, 4.0, 8.0, 8.0]
    assert {b.url for b in pool.backends} == {"http://10.0.0.9:80", "http://10.0.0.1:80"}
    assert pool.discovery is not None and pool.discovery.failing
    plugin.fail = False
    assert await runner.round() == 8 and not pool.discovery.failing
