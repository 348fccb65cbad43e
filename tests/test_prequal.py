"""The ``prequal`` algorithm (CONTRACT section 16, issue 23 item 2).

The decision rule is driven through the algorithm's own ``record_probe``
and ``record_failure`` on a fake clock, with ``send_probe`` replaced where
the test counts probes instead of sending them. The rest runs on real
servers: uvicorn upstreams behind ``LoadReportMiddleware``, balancers
behind the ASGI (and WSGI) middleware, probes counted where they arrive.
The headline test puts two balancers over the same backends, one of them
loading a backend the other cannot see, and compares ``prequal`` with
``round_robin`` and ``p2c`` in one run; its margins are relative, never
absolute times.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from balancekit import Backend, Balancer, ConfigError, RequestInfo
from balancekit._types import Receive, Scope, Send
from balancekit.algorithms.prequal import Prequal, interpolated, parse_report
from balancekit.load_report import DEFAULT_PATH, LoadReportMiddleware
from tests.conftest import ServerThread
from tests.helpers import balanced
from tests.upstreams import complete_lifespan

REQUEST = RequestInfo("GET", "/")
Serve = Callable[..., Any]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make(n: int) -> tuple[Backend, ...]:
    return tuple(Backend(f"http://10.9.0.{i}:80") for i in range(1, n + 1))


def quiet(**options: Any) -> tuple[Prequal, Clock]:
    """A Prequal on a fake clock that sends no probe (probe_rate 0)."""
    clock = Clock()
    return Prequal(probe_rate=0, clock=clock, **options), clock


def answer(algorithm: Prequal, backend: Backend, in_flight: float, latency_ms: float) -> None:
    algorithm.record_probe(backend, in_flight, latency_ms)


def picks(algorithm: Prequal, backends: tuple[Backend, ...], n: int) -> list[int]:
    return [backends.index(algorithm.pick(backends, REQUEST)) for _ in range(n)]


# --- the decision rule ---------------------------------------------------------


def test_the_cold_backend_with_the_lowest_latency_wins_and_hot_ones_wait() -> None:
    algorithm, _ = quiet(max_reuse=1)
    a, b, c = backends = make(3)
    answer(algorithm, a, 1, 30.0)
    answer(algorithm, b, 1, 10.0)
    answer(algorithm, c, 9, 1.0)  # fastest, but above the 0.8 quantile of (1, 1, 9)
    assert picks(algorithm, backends, 3) == [1, 0, 2]  # cold by latency, then the hot one


def test_when_every_answer_left_is_hot_the_least_loaded_hot_one_wins() -> None:
    algorithm, _ = quiet(max_reuse=1)
    backends = make(10)
    for backend in backends[:8]:
        answer(algorithm, backend, 0, 5.0)
    answer(algorithm, backends[8], 20, 1.0)
    answer(algorithm, backends[9], 10, 50.0)
    # The threshold, 2 (0.8 of eight 0s, 10 and 20), stays while the cold
    # answers are used up: then the hot one with fewer in flight goes
    # first, whatever its latency.
    assert sorted(picks(algorithm, backends, 8)) == list(range(8))
    assert picks(algorithm, backends, 2) == [9, 8]


def test_each_use_of_an_answer_counts_one_more_request_in_flight() -> None:
    algorithm, _ = quiet(max_reuse=10)
    a, b = backends = make(2)
    answer(algorithm, a, 0, 10.0)
    answer(algorithm, b, 3, 1.0)  # hot: above 2.4, the 0.8 quantile of (0, 3)
    # a takes 0, 1, 2 and is then at 3, hot as b: fewest in flight ties,
    # the lower latency (b) decides. Without the bump a would win forever.
    assert picks(algorithm, backends, 4) == [0, 0, 0, 1]


def test_an_answer_is_used_at_most_max_reuse_times() -> None:
    algorithm, _ = quiet(max_reuse=3)
    a, b = backends = make(2)
    b.record_latency(10.0)
    b.active_requests = 7  # the fallback's counts would choose a
    a.record_latency(1.0)
    answer(algorithm, b, 0, 1.0)
    assert picks(algorithm, backends, 3) == [1, 1, 1]
    assert picks(algorithm, backends, 3) == [0, 0, 0]  # p2c over local counts


def test_answers_older_than_max_age_are_not_used() -> None:
    algorithm, clock = quiet(max_age=2.0, max_reuse=100)
    a, b = backends = make(2)
    a.record_latency(1.0)
    b.record_latency(50.0)
    answer(algorithm, b, 0, 1.0)
    assert picks(algorithm, backends, 2) == [1, 1]
    clock.now += 2.5
    assert picks(algorithm, backends, 2) == [0, 0]  # b's answer aged out: local counts


def test_only_the_backends_offered_are_picked() -> None:
    algorithm, _ = quiet(max_reuse=100)
    a, b, c = make(3)
    answer(algorithm, a, 0, 1.0)  # the best answer, for a backend not offered
    answer(algorithm, b, 2, 9.0)
    for _ in range(20):
        assert algorithm.pick((b, c), REQUEST) in (b, c)
    assert algorithm.pick((a, b), REQUEST) is a


def test_the_quantile_is_interpolated_between_ranks() -> None:
    assert interpolated([1, 1, 9], 0.8) == pytest.approx(5.8)
    assert interpolated([0, 3], 0.8) == pytest.approx(2.4)
    assert interpolated([4], 0.8) == 4
    assert interpolated([2, 2, 2, 2], 0.5) == 2


def test_without_any_answer_the_pick_is_p2c_over_local_counts() -> None:
    algorithm, _ = quiet()
    a, b = backends = make(2)
    a.record_latency(100.0)
    b.record_latency(1.0)
    assert picks(algorithm, backends, 5) == [1] * 5


# --- probes: how many, to whom, and those that fail --------------------------------


class Captured(Prequal):
    """Probes noted, not sent: the test answers them (or not)."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.sent: list[Backend] = []

    def send_probe(self, backend: Backend) -> None:
        self.sent.append(backend)


@pytest.mark.parametrize(
    ("rate", "expected"),
    [
        pytest.param(3, 300, id="three"),
        pytest.param(0.5, 50, id="half"),
        pytest.param(0, 0, id="none"),
    ],
)
def test_probe_rate_probes_per_pick_fractions_adding_up(rate: float, expected: int) -> None:
    algorithm = Captured(probe_rate=rate, clock=Clock())
    backends = make(50)
    for _ in range(100):
        algorithm.pick(backends, REQUEST)
        for backend in algorithm.sent[-3:]:
            algorithm.record_probe(backend, 1, 1.0)
    # One probe per backend in flight: a draw landing on one is dropped.
    assert expected * 0.8 <= len(algorithm.sent) <= expected


def test_probes_in_flight_are_bounded_by_pool_size_and_one_per_backend() -> None:
    algorithm = Captured(probe_rate=3, pool_size=4, clock=Clock())
    many = make(20)
    for _ in range(100):
        algorithm.pick(many, REQUEST)
    assert len(algorithm.sent) == 4  # none answered: no more go out
    assert len(set(algorithm.sent)) == 4
    for backend in algorithm.sent:
        algorithm.record_probe(backend, 0, 1.0)
    algorithm.pick(many, REQUEST)
    assert 4 < len(algorithm.sent) <= 7
    few = make(2)
    other = Captured(probe_rate=3, clock=Clock())
    for _ in range(50):
        other.pick(few, REQUEST)
    assert sorted(b.url for b in other.sent) == sorted(b.url for b in few)


def test_a_probe_never_answered_stops_counting_well_past_its_timeout() -> None:
    clock = Clock()
    algorithm = Captured(probe_rate=1, probe_timeout=0.5, clock=clock)
    (a,) = backends = make(1)
    algorithm.pick(backends, REQUEST)
    algorithm.pick(backends, REQUEST)
    assert algorithm.sent == [a]  # still in flight
    clock.now += 2.5  # its loop ended without a word: 2 x timeout + 1 s later, probe again
    algorithm.pick(backends, REQUEST)
    assert algorithm.sent == [a, a]


def test_a_failed_probe_is_logged_once_and_the_backend_scored_locally(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    algorithm = Captured(probe_rate=1, clock=clock, max_reuse=1)
    (a,) = backends = make(1)
    caplog.set_level(logging.INFO, logger="balancekit")
    for _ in range(5):
        algorithm.pick(backends, REQUEST)
        for backend in algorithm.sent:
            algorithm.record_failure(backend, "status 404 for /x")
        algorithm.sent.clear()
        clock.now += 0.1
    warnings = [r for r in caplog.records if "does not answer its load probe" in r.message]
    assert len(warnings) == 1
    assert "status 404" in warnings[0].message
    # Retried after 1 s (then 2, 4, ... at most 30): not at every pick.
    clock.now += 1.0
    algorithm.pick(backends, REQUEST)
    assert algorithm.sent == [a]
    algorithm.record_probe(a, 0, 1.0)
    algorithm.pick(backends, REQUEST)
    assert any("answers its load probe again" in r.message for r in caplog.records)


def test_a_backend_that_does_not_answer_competes_with_its_local_counts() -> None:
    clock = Clock()
    algorithm = Captured(probe_rate=3, clock=clock, max_reuse=1)
    a, b = backends = make(2)
    a.record_latency(1.0)  # this balancer finds a fast
    algorithm.record_failure(a, "not the JSON load report")
    for _ in range(200):
        algorithm.pick(backends, REQUEST)
        for backend in algorithm.sent:
            algorithm.record_probe(backend, 2, 20.0)  # b reports load and 20 ms
        algorithm.sent.clear()
    assert a not in algorithm.sent
    # a's stand-in (0 in flight here, 1 ms) beats b's answers most of the time.
    chosen = Counter(picks(algorithm, backends, 100))
    assert chosen[0] > chosen[1]


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"<html>busy</html>", id="html"),
        pytest.param(b"[1, 2]", id="list"),
        pytest.param(b'{"in_flight": "3", "latency_ms": 1}', id="string"),
        pytest.param(b'{"in_flight": true, "latency_ms": 1}', id="bool"),
        pytest.param(b'{"in_flight": -1, "latency_ms": 1}', id="negative"),
        pytest.param(b'{"in_flight": 1, "latency_ms": NaN}', id="nan"),
        pytest.param(b'{"in_flight": 1e400, "latency_ms": 1}', id="infinite"),
        pytest.param(b'{"latency_ms": 1}', id="missing"),
        pytest.param(b"[" * 3000 + b"]" * 3000, id="deep"),
        pytest.param(b"\xff\xfe", id="not-utf8"),
    ],
)
def test_answers_that_are_not_the_report_are_refused(body: bytes) -> None:
    with pytest.raises(ValueError):
        parse_report(body)


def test_the_report_as_load_report_writes_it() -> None:
    assert parse_report(b'{"in_flight": 3, "latency_ms": 12.5}') == (3.0, 12.5)


# --- options -----------------------------------------------------------------------


def config(options: dict[str, Any]) -> dict[str, Any]:
    algorithm = {"name": "prequal", **options}
    return {"pools": {"api": {"backends": ["http://10.9.0.1:80"], "algorithm": algorithm}}}


@pytest.mark.parametrize(
    ("options", "key", "words"),
    [
        pytest.param({"hot_quantile": 0}, "hot_quantile", "strictly between 0 and 1", id="q0"),
        pytest.param({"hot_quantile": 1}, "hot_quantile", "strictly between 0 and 1", id="q1"),
        pytest.param({"hot_quantile": 1.5}, "hot_quantile", "strictly between", id="q-big"),
        pytest.param({"probe_rate": -1}, "probe_rate", ">= 0", id="negative-rate"),
        pytest.param({"probe_rate": "3"}, "probe_rate", "a number", id="string-rate"),
        pytest.param({"pool_size": 0}, "pool_size", "positive integer", id="pool-0"),
        pytest.param({"pool_size": 2.5}, "pool_size", "positive integer", id="pool-float"),
        pytest.param({"max_reuse": 0}, "max_reuse", "positive integer", id="reuse-0"),
        pytest.param({"max_age": 0}, "max_age", "positive", id="age-0"),
        pytest.param({"probe_timeout": -1}, "probe_timeout", "positive", id="timeout"),
        pytest.param({"probe_path": "load"}, "probe_path", "starting with '/'", id="path"),
    ],
)
def test_bad_options_are_a_config_error_with_the_key_path(
    options: dict[str, Any], key: str, words: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        Balancer(config(options))
    message = str(caught.value)
    assert f"pools.api.algorithm.{key}: " in message
    assert words in message


def test_an_unknown_option_says_which_it_meant() -> None:
    with pytest.raises(ConfigError, match=r"pools\.api\.algorithm\.probe_rat: .*probe_rate"):
        Balancer(config({"probe_rat": 2}))


def test_the_defaults() -> None:
    algorithm = Balancer(config({})).pools["api"].algorithm
    assert isinstance(algorithm, Prequal)
    assert (algorithm.probe_rate, algorithm.pool_size, algorithm.hot_quantile) == (3, 16, 0.8)
    assert (algorithm.max_age, algorithm.probe_timeout, algorithm.max_reuse) == (1.0, 0.5, 2)
    assert algorithm.probe_path == DEFAULT_PATH


# --- real servers ------------------------------------------------------------------


class Upstream:
    """An upstream answering its name after ``service`` seconds, at most
    ``capacity`` requests at once (more wait their turn, as in a server
    with that many workers). ``/hold`` takes a place and keeps it until
    ``release`` is set. ``probe`` is what it answers on the probe path
    when no LoadReportMiddleware is in front: "none" (404), "garbage",
    "huge" or "slow"."""

    def __init__(
        self, name: str, *, capacity: int = 1000, service: float = 0.0, probe: str = "none"
    ) -> None:
        self.name = name
        self.service = service
        self.probe = probe
        self.places = asyncio.Semaphore(capacity)
        self.release = threading.Event()
        self.served = 0
        self.holding = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await complete_lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        if scope["path"] == DEFAULT_PATH:
            await self._probe(send)
            return
        async with self.places:
            if scope["path"].endswith("/hold"):
                self.holding += 1
                try:
                    await asyncio.to_thread(self.release.wait, 20)
                finally:
                    self.holding -= 1
            elif self.service:
                await asyncio.sleep(self.service)
            self.served += 1
        await _answer(send, 200, self.name.encode())

    async def _probe(self, send: Any) -> None:
        if self.probe == "garbage":
            await _answer(send, 200, b"<html>load: low</html>")
        elif self.probe == "huge":
            head = b'{"in_flight": 0, "latency_ms": 0, "pad": "'
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": head, "more_body": True})
            for _ in range(64):
                await send({"type": "http.response.body", "body": b"x" * 16384, "more_body": True})
            await send({"type": "http.response.body", "body": b'"}'})
        elif self.probe == "slow":
            await asyncio.sleep(2.0)
            await _answer(send, 200, b'{"in_flight": 0, "latency_ms": 0}')
        else:
            await _answer(send, 404, b"not found")


async def _answer(send: Any, status: int, body: bytes) -> None:
    headers = [(b"content-type", b"text/plain"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class Tally:
    """Probes in flight at once across several backends, and the most seen."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.in_flight = 0
        self.most = 0

    def add(self, n: int) -> None:
        with self.lock:
            self.in_flight += n
            self.most = max(self.most, self.in_flight)


class ProbeCounter:
    """In front of an app: counts requests to the probe path, and the most
    in flight at once (here, and in ``tally`` across backends); ``delay``
    holds each probe that long first."""

    def __init__(self, app: Any, *, delay: float = 0.0, tally: Tally | None = None) -> None:
        self.app = app
        self.delay = delay
        self.tally = tally or Tally()
        self.probes = 0
        self.in_flight = 0
        self.most = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != DEFAULT_PATH:
            await self.app(scope, receive, send)
            return
        self.probes += 1
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        self.tally.add(1)
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
            self.tally.add(-1)


def reporting(
    upstream: Upstream, *, delay: float = 0.0, tally: Tally | None = None
) -> ProbeCounter:
    return ProbeCounter(LoadReportMiddleware(upstream), delay=delay, tally=tally)


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=30) as c:
        yield c


def prequal_pool(**options: Any) -> dict[str, Any]:
    return {"algorithm": {"name": "prequal", **options}, "retries": {"attempts": 1}}


def get_all(url: str, n: int, workers: int) -> list[tuple[str, float]]:
    """``n`` GETs of ``url`` from ``workers`` threads: (body, seconds) each."""

    def one(_: int) -> tuple[str, float]:
        started = time.perf_counter()
        response = shared.get(url)
        assert response.status_code == 200, response.text
        return response.text, time.perf_counter() - started

    with httpx.Client(timeout=30) as shared, ThreadPoolExecutor(workers) as pool:
        return list(pool.map(one, range(n)))


def test_probes_reach_the_probe_path_within_the_rate_and_pool_size(serve: Serve) -> None:
    upstreams = [Upstream(name) for name in "abc"]
    tally = Tally()
    counters = [reporting(u, delay=0.05, tally=tally) for u in upstreams]
    servers = [serve(c) for c in counters]
    proxy, _ = balanced(
        serve,
        [s.url for s in servers],
        engine="httptools",
        pool=prequal_pool(probe_rate=1, pool_size=2),
    )
    requests = 120
    answers = get_all(proxy.url + "/api/x", requests, 8)
    assert len(answers) == requests
    probes = sum(c.probes for c in counters)
    print(f"\n{probes} probes for {requests} requests, at most {tally.most} in flight")
    assert 0 < probes <= 1 * requests
    # Probes are slow here (50 ms): many would overlap if nothing bounded them.
    assert max(c.most for c in counters) == 1  # one per backend at a time
    assert tally.most == 2  # and pool_size in all
    assert sum(u.served for u in upstreams) == requests


def test_default_rate_probes_at_most_three_per_request(serve: Serve) -> None:
    counters = [reporting(Upstream(name)) for name in "ab"]
    servers = [serve(c) for c in counters]
    proxy, _ = balanced(serve, [s.url for s in servers], engine="aiohttp", pool=prequal_pool())
    requests = 100
    get_all(proxy.url + "/api/x", requests, 4)
    probes = sum(c.probes for c in counters)
    assert all(c.probes for c in counters)
    assert probes <= 3 * requests  # never over the rate (one per backend in flight, too)


@pytest.mark.parametrize("probe", ["none", "garbage", "huge", "slow"])
def test_a_backend_without_a_usable_probe_is_still_served(
    serve: Serve, probe: str, caplog: pytest.LogCaptureFixture
) -> None:
    good = Upstream("good")
    odd = Upstream("odd", probe=probe)
    servers = [serve(reporting(good)), serve(ProbeCounter(odd))]
    proxy, _ = balanced(
        serve,
        [s.url for s in servers],
        engine="httptools",
        pool=prequal_pool(probe_timeout=0.3),
    )
    deadline = time.monotonic() + 10
    # The "slow" probe takes its timeout: go on until odd's failure is in.
    while True:
        answers = get_all(proxy.url + "/api/x", 60, 4)
        warned = [r for r in caplog.records if "does not answer its load probe" in r.message]
        if warned or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert len(warned) == 1, [r.message for r in caplog.records]
    assert servers[1].url in warned[0].message
    assert odd.served > 0  # scored from local counts, still in rotation
    assert {body for body, _ in answers} <= {"good", "odd"}


def test_probes_run_under_the_wsgi_engine_too(serve: Serve) -> None:
    counters = [reporting(Upstream(name)) for name in "ab"]
    servers = [serve(c) for c in counters]
    proxy, _ = balanced(serve, [s.url for s in servers], engine="wsgi", pool=prequal_pool())
    answers = get_all(proxy.url + "/api/x", 60, 4)
    assert {body for body, _ in answers} <= {"a", "b"}
    deadline = time.monotonic() + 5
    while sum(c.probes for c in counters) == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert 0 < sum(c.probes for c in counters) <= 3 * 60


# --- the headline: two balancers, one backend loaded out of the other's sight -------


def p90(seconds: list[float]) -> float:
    ordered = sorted(seconds)
    return ordered[int(0.9 * len(ordered))]


def test_prequal_steers_away_from_load_another_balancer_put_on_a_backend(
    serve: Serve, client: httpx.Client
) -> None:
    # Three backends with 4 places each and 50 ms of work per request. Balancer
    # Y holds 3 long requests on b, leaving it one place: balancer X, which
    # never sees Y's requests, runs each algorithm in turn over a, b and c.
    upstreams = [Upstream(name, capacity=4, service=0.05) for name in "abc"]
    counters = [reporting(u) for u in upstreams]
    servers: list[ServerThread] = [serve(c) for c in counters]
    urls = [s.url for s in servers]
    other, _ = balanced(serve, [urls[1]], engine="httptools")
    held = ThreadPoolExecutor(3)
    futures = [held.submit(client.get, other.url + "/api/hold") for _ in range(3)]
    try:
        deadline = time.monotonic() + 5
        while upstreams[1].holding < 3:
            assert time.monotonic() < deadline, "the held requests did not arrive"
            time.sleep(0.01)
        results: dict[str, tuple[dict[str, float], float]] = {}
        for algorithm in ("round_robin", "p2c", "prequal"):
            pool = prequal_pool() if algorithm == "prequal" else {"algorithm": algorithm}
            proxy, _ = balanced(serve, urls, engine="httptools", pool=pool)
            answers = get_all(proxy.url + "/api/work", 200, 6)
            shares = Counter(body for body, _ in answers)
            results[algorithm] = (
                {name: shares[name] / len(answers) for name in "abc"},
                p90([seconds for _, seconds in answers]),
            )
    finally:
        upstreams[1].release.set()
        for future in futures:
            assert future.result(timeout=30).status_code == 200
        held.shutdown()
    lines = [
        f"{name:12} share a {s['a']:.2f} b {s['b']:.2f} c {s['c']:.2f}  p90 {p * 1000:.0f} ms"
        for name, (s, p) in results.items()
    ]
    probes = [c.probes for c in counters]  # all prequal's: the others do not probe
    lines.append(f"prequal's probes: a {probes[0]} b {probes[1]} c {probes[2]} for 200 requests")
    print("\n" + "\n".join(lines))
    assert sum(probes) <= 3 * 200, lines
    (rr, rr_p90), (p2c, p2c_p90), (prequal, prequal_p90) = results.values()
    # Measured (2 cores, other tests running): b's share 0.33 / 0.18-0.20 /
    # 0.03-0.06 and p90 197 / 63-92 / 56-65 ms for round_robin / p2c / prequal.
    # p2c's p90 depends on whether more than a tenth of its answers happened
    # to queue at b (63 ms once: close to the 50 ms floor), so against p2c the
    # share is what shows the steering, and the p90 must only not be worse.
    assert prequal["b"] < 0.5 * min(rr["b"], p2c["b"]), lines
    assert prequal_p90 < 0.5 * rr_p90, lines
    assert prequal_p90 < 1.1 * p2c_p90, lines
