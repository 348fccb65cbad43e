"""The fault campaign: steady load through a balancer while one backend of
three misbehaves behind a fault-injecting relay (tests/faults.py).

The balancer is ``balancekit serve``'s lean server and the ASGI middleware
under uvicorn, both in this process, so that its descriptors and upstream
connections can be counted; the RSS soak runs the real ``balancekit serve``
in a process of its own. Every figure is printed: run with ``pytest -s``.

What must hold, fault by fault:

- a GET never fails while the fault strikes before any answer byte reached
  the client (latency, a trickle, a reset or close before the head, a
  black hole): it is retried on another backend. A reset or close in
  the middle of a body cannot be retried (the client has the head,
  CONTRACT section 4); those GETs fail, but visibly: the client's read
  fails, never a short body passed off as whole;
- a POST whose bytes reached a backend is never sent again, to it or to
  another (the relays count every request id that went through them);
- a black-holed backend leaves the pool, and the time it takes is measured;
- once the balancer stops, the process's descriptors and every upstream
  connection are back to what they were before it started.
"""

from __future__ import annotations

import contextlib
import gc
import http.client
import json
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from balancekit import Balancer
from balancekit.asgi import BalanceMiddleware
from tests.conftest import free_port
from tests.faults import (
    BLACKHOLE,
    PASS,
    Fault,
    Relay,
    close_after,
    latency,
    reset_after,
    trickle,
)
from tests.helpers import app_fallback
from tests.test_commands import started, wait_until_serving
from tests.upstreams import make_echo_app

NAMES = ("a", "b", "c")
CLIENTS = 4
#: Seconds of load under each fault, and the hard stop of the whole load.
PHASE, LOAD_LIMIT = 1.0, 40.0
INTERVAL, CHECK_TIMEOUT, FALL, RISE = 0.2, 0.3, 2, 1
CONNECT_TIMEOUT, READ_TIMEOUT = 0.3, 0.6
#: An echo answer's head is about 150 bytes and its body 700: 300 is mid-body.
MID_BODY = 300
#: What a client sends, in turn: (method, route).
MIX = [("GET", "api")] * 3 + [("POST", "api"), ("GET", "probe"), ("POST", "probe")]
MIX += [("GET", "api")] * 3 + [("POST0", "api"), ("POST0", "probe")]

CAMPAIGN: list[tuple[Fault, bool]] = [  # (fault, whether it strikes after the head)
    (latency(0.05), False),
    (trickle(64, 0.005), False),
    (reset_after(10), False),
    (close_after(0), False),
    (reset_after(MID_BODY), True),
    (close_after(MID_BODY), True),
]


def pool_config(urls: list[str]) -> dict[str, Any]:
    return {
        "backends": urls,
        # Room for every GET that met the fault to be retried: the budget
        # (20% of active requests, a floor of 3) has tests of its own.
        "retries": {"attempts": 3, "budget_percent": 100},
        "timeouts": {"connect": CONNECT_TIMEOUT, "read": READ_TIMEOUT},
        "health_check": {
            "type": "http",
            "path": "/healthz",
            "interval": INTERVAL,
            "timeout": CHECK_TIMEOUT,
            "fall": FALL,
            "rise": RISE,
        },
        "outlier_detection": {
            "consecutive_failures": 3,
            "base_ejection_time": 0.5,
            "max_ejection_time": 1,
            "max_ejection_percent": 50,
        },
    }


@dataclass(frozen=True)
class Outcome:
    """One request as its client saw it."""

    phase: str  # the fault in force when it was sent
    ended: str  # and when its answer ended: it may have met either
    method: str  # GET, POST (with a body) or POST0 (without)
    route: str  # api (the pool under test) or probe
    rid: str
    status: int  # 0: no answer at all
    error: str  # the client's exception, if any (while connecting or reading the body)
    backend: str  # who answered (the echo's x-upstream header), if anyone
    wrong: str  # a complete 200 whose body is not what was asked: never allowed

    @property
    def ok(self) -> bool:
        return self.status == 200 and not self.error and not self.wrong

    @property
    def how(self) -> str:
        if self.error:
            return f"{self.status or 'no answer'} {self.error}"
        return str(self.status)


class Load:
    """``CLIENTS`` threads sending GETs and POSTs with ids until stopped.

    Of every eleven requests, six GETs and two POSTs (one with a body, one
    without) go to the pool under test on /api/; a GET and the two kinds of
    POST go to the pool on /probe/, which has the faulty backend but neither health
    checks nor outlier detection, so that requests keep meeting each fault.
    :attr:`phase` labels the requests sent from then on.
    """

    def __init__(self, url: str, limit: float = LOAD_LIMIT) -> None:
        self.url = url
        self.phase = "start"
        self.results: list[Outcome] = []
        self._stop = threading.Event()
        self._limit = limit  # a hard stop, whatever happens to the test
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._run, args=(n,), daemon=True) for n in range(CLIENTS)
        ]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=15)

    def _run(self, n: int) -> None:
        deadline = time.monotonic() + self._limit
        with httpx.Client(base_url=self.url, timeout=10) as client:
            i = 0
            while not self._stop.is_set() and time.monotonic() < deadline:
                method, route = MIX[i % len(MIX)]
                outcome = self._one(client, method, route, f"{n}-{i}")
                with self._lock:
                    self.results.append(outcome)
                i += 1

    def _one(self, client: httpx.Client, method: str, route: str, rid: str) -> Outcome:
        phase = self.phase
        path = f"/{route}/{'get' if method == 'GET' else 'post'}/{rid}"
        body = rid.encode() * 10 if method == "POST" else None
        request = client.build_request(method[:4], path, content=body)
        try:
            response = client.send(request, stream=True)
        except httpx.HTTPError as exc:
            return Outcome(phase, self.phase, method, route, rid, 0, type(exc).__name__, "", "")
        backend = response.headers.get("x-upstream", "")
        error = wrong = ""
        try:
            content = response.read()
        except httpx.HTTPError as exc:
            error = type(exc).__name__
        finally:
            response.close()
        if response.status_code == 200 and not error:
            wrong = _check(content, path, len(body or b""))
        status = response.status_code
        return Outcome(phase, self.phase, method, route, rid, status, error, backend, wrong)

    def served_by(self, name: str, phase: str) -> int:
        return sum(1 for r in list(self.results) if r.backend == name and r.phase == phase)


def _check(content: bytes, path: str, size: int) -> str:
    try:
        echoed = json.loads(content)
    except ValueError:
        return f"not the echo: {content[:60]!r}"
    if echoed.get("path") != path or echoed.get("body_size") != size:
        return f"another request's answer: {echoed.get('path')} {echoed.get('body_size')}"
    return ""


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> float:
    """Seconds until ``predicate()`` holds, polled every 10 ms."""
    began = time.monotonic()
    while not predicate():
        assert time.monotonic() - began < timeout, "condition not reached in time"
        time.sleep(0.01)
    return time.monotonic() - began


def open_fds() -> dict[str, str]:
    fds = {}
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the one listdir itself used
            fds[fd] = os.readlink(f"/proc/self/fd/{fd}")
    return fds


def established_to(ports: set[int]) -> int:
    """ESTABLISHED TCP connections from any process to one of ``ports``."""
    count = 0
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            fields = line.split()
            if fields[3] == "01" and int(fields[2].rsplit(":", 1)[1], 16) in ports:
                count += 1
    return count


@pytest.fixture
def echoes() -> list[Any]:
    """The echo apps of backends a, b and c (``.seen``: the paths each served)."""
    return [make_echo_app(name) for name in NAMES]


@pytest.fixture
def relays(serve: Callable[..., Any], echoes: list[Any]) -> Iterator[list[Relay]]:
    """The echo backends a, b and c on uvicorn, each behind a relay of its own."""
    backends = [serve(app) for app in echoes]
    made = [Relay(backend.port) for backend in backends]
    yield made
    for relay in made:
        relay.close()


@pytest.mark.parametrize("server", ["lean", "lean-slow", "uvicorn"])
def test_fault_campaign(
    server: str, serve: Callable[..., Any], relays: list[Relay], echoes: list[Any]
) -> None:
    relay_ports = {r.port for r in relays}
    backend_ports = {r.target[1] for r in relays}
    fds_before = open_fds()
    conns_before = established_to(relay_ports), established_to(backend_ports)
    balancer = Balancer(
        {
            "pools": {
                "api": pool_config([r.url for r in relays]),
                "probe": {
                    "backends": [relays[1].url, relays[0].url],
                    "retries": {"attempts": 2, "budget_percent": 100},
                    "timeouts": {"connect": CONNECT_TIMEOUT, "read": READ_TIMEOUT},
                },
            },
            "routes": [{"prefix": "/api/", "pool": "api"}, {"prefix": "/probe/", "pool": "probe"}],
        }
    )
    app = BalanceMiddleware(app_fallback, balancer=balancer)
    if server == "uvicorn":
        proxy = serve(app, lifespan="on")
    else:
        proxy = serve(app, lean=True, fast=server == "lean")
    faulty = relays[1]
    backend = balancer.pools["api"].backend(faulty.url)

    with Load(proxy.url) as load:
        wait_for(lambda: len(load.results) > 50)
        for fault, _ in CAMPAIGN:
            load.phase = str(fault)
            faulty.set(fault)
            time.sleep(PHASE)
            heal(load, faulty, balancer, f"healed from {fault}")
        load.phase = str(BLACKHOLE)
        faulty.set(BLACKHOLE)
        eject = wait_for(lambda: backend.state.value != "healthy")
        left_as = backend.state.value
        time.sleep(PHASE)
        heal(load, faulty, balancer, "healed from blackhole")
    conns_after_run = established_to(relay_ports)

    proxy.stop()
    settled = settle(fds_before, lambda: established_to(relay_ports) == conns_before[0])
    fds_after = open_fds()
    conns_after = established_to(relay_ports), established_to(backend_ports)

    results = load.results
    report(server, results, relays, eject, left_as)
    print(
        f"  descriptors {len(fds_before)} before, {len(fds_after)} after "
        f"(settled in {settled:.2f}s); upstream connections balancer->relays "
        f"{conns_before[0]} before, {conns_after_run} at the end of the load with the "
        f"balancer up, {conns_after[0]} after it stopped; relays->backends "
        f"{conns_before[1]} before, {conns_after[1]} after"
    )

    # Every non-2xx was a visible failure: no short or foreign body passed off as whole.
    assert not [r for r in results if r.wrong], "answers with the wrong body"
    struck_after_head = {str(f) for f, after in CAMPAIGN if after}
    failed_gets = [r for r in results if r.method == "GET" and not r.ok]
    assert not [r for r in failed_gets if not {r.phase, r.ended} & struck_after_head], (
        f"GETs failed: {Counter((r.phase, r.how) for r in failed_gets)}"
    )
    # A failed GET after the head is a read the client saw fail, from the faulty backend.
    assert all(r.error and r.backend == "b" for r in failed_gets), Counter(
        (r.phase, r.how, r.backend) for r in failed_gets
    )
    assert_no_post_replayed(results, relays, echoes)
    assert left_as in ("unhealthy", "ejected")
    assert eject < FALL * (INTERVAL + CHECK_TIMEOUT) + 2.0  # generous: scheduling slack
    assert conns_after == (0, 0) == conns_before, "upstream connections left open"
    leaked = {fd: target for fd, target in fds_after.items() if fd not in fds_before}
    assert len(fds_after) == len(fds_before), f"descriptors left open: {leaked}"
    if server == "lean":  # the campaign's GETs were the fast path's, not only the hand-overs
        fast = proxy.server.fast
        assert fast.answered > fast.handed_over > 0, (fast.answered, fast.handed_over)


def heal(load: Load, relay: Relay, balancer: Balancer, phase: str) -> None:
    """Switch ``relay`` back to PASS and wait until its backend serves again."""
    relay.set(PASS)
    load.phase = phase
    name = NAMES[[r.url for r in balancer.pools["api"].backends].index(relay.url)]
    wait_for(lambda: load.served_by(name, phase) >= 5, timeout=15)


def settle(fds_before: dict[str, str], done: Callable[[], bool], timeout: float = 5.0) -> float:
    """Seconds until the descriptor count is back and ``done()`` holds (or timeout)."""
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        gc.collect()
        if len(open_fds()) <= len(fds_before) and done():
            break
        time.sleep(0.05)
    return time.monotonic() - began


def assert_no_post_replayed(results: list[Outcome], relays: list[Relay], echoes: list[Any]) -> None:
    """Each POST id went out of the balancer at most once (the relays saw
    it), and reached a backend at most once (the echoes served it)."""
    sent: Counter[str] = Counter()
    spread: Counter[str] = Counter()  # how many backends it went to
    for relay in relays:
        sent.update(relay.delivered)
        spread.update(relay.delivered.keys())
    served = Counter(path.rsplit("/", 1)[1] for app in echoes for path in app.seen)
    posts = [r for r in results if r.method != "GET"]
    elsewhere = {r.rid: (r.phase, r.method, r.how) for r in posts if spread[r.rid] > 1}
    assert not elsewhere, f"POSTs sent to a second backend: {elsewhere}"
    twice = {r.rid: (r.phase, r.method, r.how) for r in posts if sent[r.rid] > 1}
    assert not twice, f"POSTs sent more than once: {twice}"
    twice = {r.rid: (r.phase, r.method, r.how) for r in posts if served[r.rid] > 1}
    assert not twice, f"POSTs served more than once: {twice}"
    # The counting itself works: every POST answered went out once...
    assert all(sent[r.rid] == served[r.rid] == 1 for r in posts if r.ok)
    # ...and some POSTs did go out to the faulty backend and fail there.
    assert any(sent[r.rid] == 1 and not r.ok for r in posts)


def report(
    server: str, results: list[Outcome], relays: list[Relay], eject: float, left_as: str
) -> None:
    gets = [r for r in results if r.method == "GET"]
    # A request is reported under the fault it was sent under.
    posts = [r for r in results if r.method != "GET"]
    print(f"\n[{server}] {len(results)} requests ({len(gets)} GET, {len(posts)} POST)")
    for phase in dict.fromkeys(r.phase for r in results):
        here = [r for r in results if r.phase == phase]
        failed_gets = Counter(r.how for r in here if r.method == "GET" and not r.ok)
        failed_posts = Counter(
            f"{r.method} {r.how}" for r in here if r.method != "GET" and not r.ok
        )
        print(
            f"  {phase:<28} {len(here):>5} sent, {sum(r.backend == 'b' for r in here):>4} "
            f"answered by b; failed GETs {sum(failed_gets.values())} {dict(failed_gets)}; "
            f"failed POSTs {sum(failed_posts.values())} {dict(failed_posts)}"
        )
    print(
        f"  black-holed b: {left_as} {eject:.2f}s after the switch; relays cut "
        f"{[r.cut for r in relays]} connections, accepted {[r.connections for r in relays]}"
    )


# -- RSS through the real ``balancekit serve`` --------------------------------

SOAK = os.environ.get("BALANCEKIT_SOAK") == "1"
WARM_UP = 3_000


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def hammer(port: int, total: int, limit: float) -> Counter[str]:
    """``total`` keep-alive GETs from ``CLIENTS`` threads (``limit`` seconds
    at most); how they ended."""
    outcomes: Counter[str] = Counter()
    lock = threading.Lock()
    deadline = time.monotonic() + limit

    def run(n: int) -> None:
        mine: Counter[str] = Counter()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            for i in range(total // CLIENTS):
                if time.monotonic() > deadline:
                    break
                try:
                    conn.request("GET", f"/api/get/{n}-{i}")
                    response = conn.getresponse()
                    response.read()
                    mine[str(response.status)] += 1
                except (OSError, http.client.HTTPException) as exc:
                    mine[type(exc).__name__] += 1
                    conn.close()
        finally:
            conn.close()
        with lock:
            outcomes.update(mine)

    threads = [threading.Thread(target=run, args=(n,), daemon=True) for n in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=limit + 15)
    return outcomes


@pytest.mark.parametrize(
    "total",
    [
        pytest.param(10_000, id="10k"),
        pytest.param(
            100_000,
            id="100k",
            marks=pytest.mark.skipif(not SOAK, reason="the soak: set BALANCEKIT_SOAK=1"),
        ),
    ],
)
def test_rss_stays_flat_through_serve(total: int, relays: list[Relay], tmp_path: Path) -> None:
    """RSS of ``balancekit serve`` grows by less than 5 MB over ``total``
    requests (after a warm-up), while one backend cycles through faults."""
    for relay in relays:
        relay.recording = False  # 100k ids are not worth keeping
    config = tmp_path / "balancekit.toml"
    pool = pool_config([r.url for r in relays])
    config.write_text(
        "[pools.api]\n"
        f"backends = {json.dumps(pool['backends'])}\n"
        "retries = { attempts = 3, budget_percent = 100 }\n"
        f"timeouts = {{ connect = {CONNECT_TIMEOUT}, read = {READ_TIMEOUT} }}\n"
        "[pools.api.health_check]\n"
        f'type = "http"\npath = "/healthz"\ninterval = {INTERVAL}\n'
        f"timeout = {CHECK_TIMEOUT}\nfall = {FALL}\nrise = {RISE}\n"
        "[pools.api.outlier_detection]\n"
        "consecutive_failures = 3\nbase_ejection_time = 0.5\nmax_ejection_time = 1\n"
        '[[routes]]\nprefix = "/api/"\npool = "api"\n'
    )
    faults = [PASS, reset_after(MID_BODY), close_after(0), latency(0.01), trickle(256, 0.002)]
    stop = threading.Event()

    def cycle() -> None:  # one backend misbehaving in turn, the others fine
        for i in range(10_000):
            if stop.wait(0.5):
                return
            relays[1].set(faults[i % len(faults)])

    port = free_port()
    with started("serve", str(config), "--port", str(port)) as running:
        running.wait_for("serving on")
        wait_until_serving(f"http://127.0.0.1:{port}")
        pid = running.process.pid
        cycler = threading.Thread(target=cycle, daemon=True)
        cycler.start()
        try:
            hammer(port, WARM_UP, limit=30)
            before, fds_before = rss_kb(pid), len(os.listdir(f"/proc/{pid}/fd"))
            began = time.monotonic()
            outcomes = hammer(port, total, limit=600 if SOAK else 40)
            took = time.monotonic() - began
            after, fds_after = rss_kb(pid), len(os.listdir(f"/proc/{pid}/fd"))
        finally:
            stop.set()
            cycler.join(timeout=5)
    done = sum(outcomes.values())
    print(
        f"\n[serve] RSS {before / 1024:.1f} MB before, {after / 1024:.1f} MB after "
        f"{done} requests ({took:.1f}s, {done / took:.0f}/s; growth "
        f"{(after - before) / 1024:+.2f} MB); serve's descriptors {fds_before} -> {fds_after}; "
        f"outcomes {dict(outcomes)}"
    )
    assert done >= total * 0.9 or not SOAK and done >= 5_000, "too few requests to judge"
    assert after - before < 5 * 1024


# -- Defects found by the campaign, reduced ----------------------------------


@pytest.mark.parametrize(
    "transport",
    [
        "httptools",
        "aiohttp",
        "httpx",
    ],
)
def test_a_bodiless_post_is_not_sent_again_when_its_kept_alive_connection_dies(
    transport: str, serve: Callable[..., Any], relays: list[Relay], echoes: list[Any]
) -> None:
    """The backend got the POST and its connection closed before answering:
    the POST must not be sent to it again (RFC 9110 section 9.2.2: a proxy
    MUST NOT automatically retry non-idempotent requests)."""
    relay = relays[1]
    balancer = Balancer(
        {
            "transport": transport,
            "pools": {"api": {"backends": [relay.url]}},
            "routes": [{"prefix": "/api/", "pool": "api"}],
        }
    )
    proxy = serve(BalanceMiddleware(app_fallback, balancer=balancer), lean=True)
    with httpx.Client(base_url=proxy.url) as client:
        assert client.get("/api/get/warm").status_code == 200  # a connection kept alive
        relay.set(close_after(0))  # the next answer is lost, after the request arrived
        answer = client.post("/api/post/once")
    print(
        f"\n[{transport}] POST without a body: {answer.status_code}, "
        f"sent {relay.delivered['once']}x, served {echoes[1].seen.count('/api/post/once')}x"
    )
    assert relay.delivered["once"] == 1
