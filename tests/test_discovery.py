"""Discovery: backends that come and go, from a file or from DNS.

Everything runs for real: uvicorn upstreams, the ASGI middleware under
uvicorn in front of them, a file the test rewrites, and (for ``dns``) a
dnsmasq on 127.0.0.1 whose records the test changes while it runs.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from balancekit import Balancer, ConfigError, hookimpl
from balancekit._plugins import make_plugin_manager
from balancekit.asgi import BalanceMiddleware
from balancekit.discovery import DNSDiscovery, FileDiscovery
from balancekit.discovery._runner import DiscoveryRunner, parse_answer
from balancekit.testing import DiscoveryCheckFailed, check_discovery
from tests.conftest import ServerThread, free_port, need
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

    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    balancer = Balancer(
        {"pools": {"api": {"backends": ["http://10.0.0.9:80"]}}}, metrics_registry=registry
    )
    pool = balancer.pools["api"]
    plugin = Flaky()
    runner = DiscoveryRunner(pool, plugin, type_name="flaky", interval=8)
    assert await runner.round() == 8
    plugin.fail = True
    delays = [await runner.round() for _ in range(5)]
    assert delays == [1.0, 2.0, 4.0, 8.0, 8.0]
    assert {b.url for b in pool.backends} == {"http://10.0.0.9:80", "http://10.0.0.1:80"}
    assert pool.discovery is not None and pool.discovery.failing
    errors = registry.get_sample_value("balancekit_discovery_errors_total", {"pool": "api"})
    assert errors == 5
    plugin.fail = False
    assert await runner.round() == 8 and not pool.discovery.failing


# --- DNS: a real dnsmasq whose records the tests change ------------------------------------


class DNSServer:
    """dnsmasq on 127.0.0.1 and a free port, answering for ``bk.test``.

    A and AAAA records come from a hosts file, re-read on SIGHUP; SRV
    records from a conf file, which SIGHUP does not re-read, so setting
    them restarts dnsmasq on the same port. TTLs are 1 s. Every query is
    logged, for counting.
    """

    def __init__(self, binary: str, directory: Path) -> None:
        self.binary = binary
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.hosts = directory / "hosts"
        self.conf = directory / "dnsmasq.conf"
        self.log = directory / "queries.log"
        self.hosts.write_text("")
        self.conf.write_text("")
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                self.binary,
                "--no-daemon",
                f"--port={self.port}",
                "--listen-address=127.0.0.1",
                "--bind-interfaces",
                "--no-resolv",
                "--no-hosts",
                f"--addn-hosts={self.hosts}",
                f"--conf-file={self.conf}",
                "--local=/bk.test/",  # NXDOMAIN for unknown names, never forwarded
                "--local-ttl=1",
                "--pid-file=",
                f"--user={os.environ.get('USER') or 'root'}",
                "--log-queries",
                f"--log-facility={self.log}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(self._answers, what="dnsmasq to answer")

    def _answers(self) -> bool:
        assert self.process is not None and self.process.poll() is None, "dnsmasq exited"
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        probe.settimeout(0.2)
        try:  # a bare query for "probe.bk.test" A
            probe.sendto(
                b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00"
                b"\x05probe\x02bk\x04test\x00\x00\x01\x00\x01",
                ("127.0.0.1", self.port),
            )
            return bool(probe.recv(512))
        except OSError:
            return False
        finally:
            probe.close()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)
        self.process = None

    def set_hosts(self, records: dict[str, list[str]]) -> None:
        self.hosts.write_text(
            "".join(f"{address} {name}\n" for name, addrs in records.items() for address in addrs)
        )
        assert self.process is not None
        self.process.send_signal(signal.SIGHUP)

    def set_srv(self, records: list[tuple[str, str, int, int, int]]) -> None:
        """(name, target, port, priority, weight) records; restarts dnsmasq."""
        self.conf.write_text(
            "".join(
                f"srv-host={name},{target},{port},{priority},{weight}\n"
                for name, target, port, priority, weight in records
            )
        )
        self.stop()
        self.start()

    def queries(self, name: str, rdtype: str = "A") -> int:
        text = self.log.read_text() if self.log.exists() else ""
        return text.count(f"query[{rdtype}] {name} from")


@pytest.fixture(scope="session")
def dns_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DNSServer]:
    binary = shutil.which("dnsmasq") or (
        "/usr/sbin/dnsmasq" if os.path.exists("/usr/sbin/dnsmasq") else None
    )
    need(binary is not None, "dnsmasq is not installed (apt-get install dnsmasq-base)")
    assert binary is not None
    server = DNSServer(binary, tmp_path_factory.mktemp("dns"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def dns(dns_server: DNSServer) -> Iterator[DNSServer]:
    """The session's dnsmasq, running and with no records."""
    if dns_server.process is None:
        dns_server.start()
    dns_server.set_hosts({})
    yield dns_server
    if dns_server.conf.read_text():
        dns_server.set_srv([])


@pytest.fixture
def same_port(serve: Callable[..., ServerThread]) -> dict[str, ServerThread]:
    """Echo upstreams a, b and c on one port of 127.0.0.2, .3 and .4 (an A
    record gives addresses, the port comes from the config)."""
    port = free_port()
    return {
        name: serve(make_echo_app(name), host=f"127.0.0.{i + 2}", port=port)
        for i, name in enumerate("abc")
    }


def _host(server: ServerThread) -> str:
    return server.url.split("//")[1].split(":")[0]


def test_dns_backends_appear_and_disappear_as_the_records_change(serve, dns, same_port) -> None:
    a, b, c = same_port["a"], same_port["b"], same_port["c"]
    dns.set_hosts({"api.bk.test": [_host(a), _host(b)]})
    discovery = {
        "type": "dns",
        "name": "api.bk.test",
        "port": a.port,
        "resolver": dns.address,
        "interval": 1,
    }
    server, balancer = front(serve, [], discovery)
    wait_for(lambda: set(urls(balancer)) == {a.url, b.url}, what="a and b")
    assert set(hits(server, 6)) == {"a", "b"}

    # Time from a change of the records to traffic on the new backend.
    delays = []
    for _ in range(3):
        dns.set_hosts({"api.bk.test": [_host(a), _host(b), _host(c)]})
        changed = time.monotonic()
        wait_for(lambda: c.url in urls(balancer), what="c")
        delays.append(time.monotonic() - changed)
        assert set(hits(server, 6)) == {"a", "b", "c"}
        dns.set_hosts({"api.bk.test": [_host(a), _host(b)]})
        wait_for(lambda: c.url not in urls(balancer), what="c gone")
    assert max(delays) < 3.0, delays
    status = balancer.status()["pools"]["api"]
    assert status["discovery"]["type"] == "dns" and not status["discovery"]["failing"]
    assert {b["source"] for b in status["backends"]} == {"discovery"}


def test_dns_a_name_that_stops_existing_leaves_the_static_backends(serve, dns, named) -> None:
    static = named["d"]
    b = named["b"]
    dns.set_hosts({"gone.bk.test": ["127.0.0.1"]})
    discovery = {
        "type": "dns",
        "name": "gone.bk.test",
        "port": b.port,
        "resolver": dns.address,
        "interval": 1,
    }
    server, balancer = front(serve, [static.url], discovery)
    wait_for(lambda: b.url in urls(balancer), what="b")
    dns.set_hosts({})  # NXDOMAIN: an answer with nothing in it
    wait_for(lambda: urls(balancer) == {static.url: "config"}, what="static only")
    assert set(hits(server, 4)) == {"d"}
    assert not balancer.status()["pools"]["api"]["discovery"]["failing"]


def test_dns_srv_gives_ports_weights_and_backups(serve, dns, named) -> None:
    a, b, c = named["a"], named["b"], named["c"]
    dns.set_hosts({"one.bk.test": ["127.0.0.1"]})
    dns.set_srv(
        [
            ("_http._tcp.api.bk.test", "one.bk.test", a.port, 10, 3),
            ("_http._tcp.api.bk.test", "one.bk.test", b.port, 10, 1),
            ("_http._tcp.api.bk.test", "one.bk.test", c.port, 20, 5),
            ("_http._tcp.api.bk.test", "missing.bk.test", 9, 10, 1),
        ]
    )
    discovery = {
        "type": "dns",
        "name": "_http._tcp.api.bk.test",
        "record": "srv",
        "resolver": dns.address,
        "interval": 1,
    }
    server, balancer = front(serve, [], discovery, algorithm="weighted_round_robin")
    wait_for(lambda: len(urls(balancer)) == 3, what="three SRV backends")
    pool = balancer.pools["api"]
    assert (pool.backend(a.url).weight, pool.backend(a.url).backup) == (3, False)
    assert (pool.backend(b.url).weight, pool.backend(b.url).backup) == (1, False)
    assert (pool.backend(c.url).weight, pool.backend(c.url).backup) == (5, True)
    seen = hits(server, 16)
    assert set(seen) == {"a", "b"} and seen["a"] == 12, seen  # 3:1, c only a backup

    # Priorities move: c becomes the one primary, in place.
    kept = pool.backend(c.url)
    dns.set_srv([("_http._tcp.api.bk.test", "one.bk.test", c.port, 1, 5)])
    wait_for(lambda: set(urls(balancer)) == {c.url}, what="c alone")
    assert pool.backend(c.url) is kept and not kept.backup
    assert set(hits(server, 3)) == {"c"}


def test_dns_resolver_down_keeps_the_last_good_set_under_load(serve, dns, same_port) -> None:
    a, b = same_port["a"], same_port["b"]
    dns.set_hosts({"api.bk.test": [_host(a), _host(b)]})
    discovery = {
        "type": "dns",
        "name": "api.bk.test",
        "port": a.port,
        "resolver": dns.address,
        "interval": 1,
        "timeout": 0.5,
    }
    server, balancer = front(serve, [], discovery)
    wait_for(lambda: set(urls(balancer)) == {a.url, b.url}, what="a and b")
    failed = []
    done = threading.Event()
    served = Counter[str]()

    def load() -> None:
        with httpx.Client(base_url=server.url, timeout=10) as client:
            while not done.is_set():
                response = client.get("/api/x")
                if response.status_code == 200:
                    served[response.headers["x-upstream"]] += 1
                else:
                    failed.append(response.status_code)
                time.sleep(0.01)

    with ThreadPoolExecutor(4) as pool:
        workers = [pool.submit(load) for _ in range(4)]
        time.sleep(0.5)
        dns.stop()
        wait_for(lambda: balancer.status()["pools"]["api"]["discovery"]["failing"], what="failing")
        time.sleep(3)  # several failed rounds
        assert set(urls(balancer)) == {a.url, b.url}
        dns.start()
        wait_for(
            lambda: not balancer.status()["pools"]["api"]["discovery"]["failing"],
            what="recovered",
        )
        done.set()
        for worker in workers:
            worker.result()
    assert failed == [] and sum(served.values()) > 100 and set(served) == {"a", "b"}
    status = balancer.status()["pools"]["api"]["discovery"]
    assert "api.bk.test" in status["last_error"]


async def test_dns_builtin_passes_the_kit(dns) -> None:
    dns.set_hosts({"kit.bk.test": ["127.0.0.5", "::1"]})
    check_discovery(DNSDiscovery, name="kit.bk.test", port=80, resolver=dns.address)
    plugin = DNSDiscovery(name="kit.bk.test", port=8080, resolver=dns.address)
    assert sorted(await plugin.resolve()) == ["http://127.0.0.5:8080", "http://[::1]:8080"]
    assert plugin.ttl == 1.0


@pytest.mark.parametrize(
    ("discovery", "path", "message"),
    [
        pytest.param({"name": "api.internal"}, "port", "is required", id="a-without-port"),
        pytest.param({"name": "x", "port": 80, "record": "mx"}, "record", "'srv'", id="record"),
        pytest.param(
            {"name": "x", "port": 80, "resolver": "localhost"}, "resolver", "host:port", id="r1"
        ),
        pytest.param(
            {"name": "x", "port": 80, "resolver": "dns.internal:53"}, "resolver", "IP", id="r2"
        ),
        pytest.param(
            {"name": "x", "port": 80, "resolver": "10.0.0.1:99999"}, "resolver", "port", id="r3"
        ),
        pytest.param({"name": "x", "port": 0}, "port", "1 to 65535", id="port-0"),
        pytest.param({"name": "_a._tcp.x", "record": "srv", "port": 80}, "port", "SRV", id="srv"),
        pytest.param({"name": "x", "port": 80, "scheme": "ftp"}, "scheme", "'https'", id="scheme"),
        pytest.param({"port": 80}, "name", "is required", id="no-name"),
        pytest.param({"name": "x", "port": 80, "ttl": 5}, "ttl", "unknown key", id="unknown"),
    ],
)
def test_bad_dns_tables_are_config_errors(discovery, path, message) -> None:
    with pytest.raises(ConfigError) as info:
        Balancer(_pool_with({"type": "dns", **discovery}))
    where = f"pools.api.discovery.{path}"
    assert any(p.path == where and message in p.message for p in info.value.problems), str(
        info.value
    )


def test_four_workers_over_redis_make_one_query_per_round(dns, redis_server) -> None:
    redis = redis_server()
    dns.set_hosts({"shared.bk.test": ["127.0.0.7"]})
    config = {
        "store": redis.url,
        "pools": {
            "api": {
                "backends": [],
                "discovery": {
                    "type": "dns",
                    "name": "shared.bk.test",
                    "port": 80,
                    "resolver": dns.address,
                    "interval": 5,
                },
            }
        },
    }
    workers = [Balancer(config) for _ in range(4)]
    try:
        for worker in workers:
            worker.start_background()  # a loop of its own each, as four processes have
        wanted = "http://127.0.0.7:80"
        wait_for(lambda: all(wanted in urls(w) for w in workers), what="every worker")
        before = dns.queries("shared.bk.test")
        started = time.monotonic()
        time.sleep(6)
        queries = dns.queries("shared.bk.test") - before
        elapsed = time.monotonic() - started
        # The TTL (1 s) is sooner than the interval: one round a second,
        # between the four of them (four times that without the lease).
        assert 0 < queries <= elapsed * 1.2 + 1, (queries, elapsed)
        dns.set_hosts({"shared.bk.test": ["127.0.0.8"]})
        moved = "http://127.0.0.8:80"
        wait_for(lambda: all(set(urls(w)) == {moved} for w in workers), what="all follow")
        adopted = [w.status()["pools"]["api"]["discovery"]["last_ok"] for w in workers]
        assert all(adopted)
    finally:
        for worker in workers:
            worker.close()
