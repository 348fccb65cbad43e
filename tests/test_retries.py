"""Retries on statuses, back-off and deadlines (CONTRACT section 11), on
every engine against real upstreams, and a rolling restart of two real
gunicorn backends that answer 503 while their fresh workers warm up.
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from balancekit import Balancer, RequestInfo
from balancekit._engine_core import Attempts
from tests.conftest import ENGINES, free_port
from tests.helpers import balanced
from tests.upstreams import answering, complete_lifespan


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def retrying(
    serve: Callable[..., Any], engine: str, statuses: list[int], **retries: Any
) -> tuple[Any, list[Any]]:
    """A balancer over upstreams answering ``statuses`` (round robin, so the
    first request goes to the first), retrying per ``retries``."""
    apps = [answering(f"u{i}", status) for i, status in enumerate(statuses)]
    urls = [serve(app).url for app in apps]
    server, _ = balanced(
        serve,
        urls,
        engine=engine,
        strip_prefix=True,
        pool={"algorithm": "round_robin", "retries": {"budget_percent": 100, **retries}},
    )
    return server, apps


def test_a_status_in_on_status_is_retried_on_another_backend(serve, engine) -> None:
    server, (bad, good) = retrying(serve, engine, [503, 200], attempts=2, on_status=[503])
    statuses = [httpx.get(f"{server.url}/api/x", timeout=10).status_code for _ in range(10)]
    assert statuses == [200] * 10
    assert len(bad.hits) == 5  # round robin still sends it its share ...
    assert len(good.hits) == 10  # ... and each of its 503s was tried again here


def test_retries_backing_off_at_once_stay_within_the_budget(serve, engine) -> None:
    # Four clients whose requests all back off at the same moment: the ones
    # backing off are still active requests of the pool, so the budget (100%)
    # is not measured against the one request that holds a backend.
    server, (bad, good) = retrying(serve, engine, [503, 200], attempts=2, on_status=[503])
    statuses: Counter[int] = Counter()
    lock = threading.Lock()

    def client() -> None:
        with httpx.Client(timeout=10) as http:
            for _ in range(25):
                status = http.get(f"{server.url}/api/x").status_code
                with lock:
                    statuses[status] += 1

    threads = [threading.Thread(target=client) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert statuses == {200: 100}
    assert len(bad.hits) > 0


def test_without_on_status_a_503_is_passed_on(serve, engine) -> None:
    server, (bad, good) = retrying(serve, engine, [503, 200], attempts=3)
    statuses = Counter(httpx.get(f"{server.url}/api/x", timeout=10).status_code for _ in range(10))
    assert statuses == {503: 5, 200: 5}
    assert len(bad.hits) + len(good.hits) == 10


def test_the_last_tries_answer_reaches_the_client_as_sent(serve, engine) -> None:
    server, apps = retrying(serve, engine, [503, 503, 503], attempts=3, on_status=[503])
    response = httpx.get(f"{server.url}/api/x", timeout=10)
    assert response.status_code == 503
    assert response.headers["content-type"] == "text/plain"  # not a problem+json
    assert response.text == f"{response.headers['x-backend']} says 503"
    # Three tries, each on a backend the request had not tried yet.
    assert [len(app.hits) for app in apps] == [1, 1, 1]


def test_a_post_is_never_retried_on_a_status(serve, engine) -> None:
    server, (bad, good) = retrying(serve, engine, [503, 200], attempts=3, on_status=[503])
    statuses = Counter(
        httpx.post(f"{server.url}/api/x", content=b"order", timeout=10).status_code
        for _ in range(6)
    )
    assert statuses == {503: 3, 200: 3}
    assert bad.hits == ["POST"] * 3 and good.hits == ["POST"] * 3


def test_attempts_bound_the_tries(serve, engine) -> None:
    server, apps = retrying(serve, engine, [502, 502, 502, 200], attempts=2, on_status=[502])
    response = httpx.get(f"{server.url}/api/x", timeout=10)
    assert response.status_code == 502
    assert sum(len(app.hits) for app in apps) == 2


def test_the_total_timeout_is_a_504_over_every_try(serve, engine) -> None:
    slow = [_sleeping(), _sleeping()]
    server, _ = balanced(
        serve,
        [serve(app).url for app in slow],
        engine=engine,
        strip_prefix=True,
        pool={"timeouts": {"read": 0.5, "total": 0.7}, "retries": {"attempts": 3}},
    )
    started = time.monotonic()
    response = httpx.get(f"{server.url}/api/x", timeout=10)
    took = time.monotonic() - started
    assert response.status_code == 504
    assert "total" in response.json()["detail"]
    # One try timed out (0.5 s); the retry had what was left, not another
    # 0.5 s (three tries without the deadline: 1.5 s).
    assert 0.65 <= took < 1.3
    assert [len(app.started) for app in slow] == [1, 1]


def _sleeping(seconds: float = 1.5) -> Any:
    started: list[float] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        import asyncio

        if scope["type"] == "lifespan":
            await complete_lifespan(receive, send)
            return
        started.append(time.monotonic())
        await asyncio.sleep(seconds)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"late"})

    app.started = started  # type: ignore[attr-defined]
    return app


# --- back-off --------------------------------------------------------------------


def test_backoff_is_full_jitter_under_a_doubling_cap() -> None:
    balancer = Balancer(
        {
            "pools": {
                "api": {
                    "backends": ["http://127.0.0.1:9001"],
                    "retries": {"backoff": 0.01, "max_backoff": 0.05},
                }
            }
        }
    )
    attempts = Attempts(balancer.pools["api"], RequestInfo("GET", "/"))
    for retry, cap in [(1, 0.01), (2, 0.02), (3, 0.04), (4, 0.05), (8, 0.05)]:
        attempts.attempt = retry  # the n-th retry follows the n-th try
        waits = [attempts.backoff() for _ in range(2000)]
        assert 0 <= min(waits) < cap * 0.05
        assert cap * 0.95 < max(waits) <= cap
        # Uniform on [0, cap]: mean cap / 2, standard error cap / 155 here.
        assert abs(statistics.fmean(waits) - cap / 2) < cap * 0.04


def test_backoff_never_runs_past_the_deadline() -> None:
    balancer = Balancer(
        {
            "pools": {
                "api": {
                    "backends": ["http://127.0.0.1:9001"],
                    "timeouts": {"total": 0.05},
                    "retries": {"backoff": 10, "max_backoff": 10},
                }
            }
        }
    )
    attempts = Attempts(balancer.pools["api"], RequestInfo("GET", "/"))
    attempts.next()
    attempts.attempt = 1
    assert all(attempts.backoff() <= 0.05 for _ in range(200))
    attempts.close()


# --- a rolling restart of gunicorn -------------------------------------------------

WARMING_APP = '''
"""A WSGI app whose fresh workers answer 503 until they are warm."""
import os, time

WARM_AFTER = float(os.environ.get("WARM_AFTER", "0.5"))
STARTED = time.monotonic()


def app(environ, start_response):
    if time.monotonic() - STARTED < WARM_AFTER:
        body = f"warming {environ['SERVER_PORT']}".encode()
        start_response("503 Service Unavailable", [("Content-Length", str(len(body)))])
        return [body]
    start_response("200 OK", [("Content-Length", "2")])
    return [b"ok"]
'''


@contextmanager
def gunicorn(app_dir: Path) -> Iterator[tuple[str, int]]:
    """A gunicorn master with two sync workers on a free port: (url, pid)."""
    port = free_port()
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "gunicorn", "--workers", "2"),
            *("--bind", f"127.0.0.1:{port}", "--graceful-timeout", "5"),
            *("--chdir", str(app_dir), "warming:app"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_warm(url, process)
        yield url, process.pid
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # the group we started
            process.wait()


def wait_warm(url: str, process: subprocess.Popen[bytes] | None = None) -> None:
    """Until ten answers in a row are 200 (every worker warm)."""
    deadline = time.monotonic() + 30
    good = 0
    while good < 10:
        assert time.monotonic() < deadline, f"{url} did not warm up"
        assert process is None or process.poll() is None, "gunicorn exited"
        try:
            good = good + 1 if httpx.get(url, timeout=2).status_code == 200 else 0
        except httpx.HTTPError:
            good = 0
        time.sleep(0.05)


def load_through_restarts(url: str, backends: list[tuple[str, int]]) -> Counter[str]:
    """GETs from four clients for ~3 s while each backend is sent SIGHUP in
    turn (gunicorn starts fresh workers, then stops the old ones gracefully);
    the outcome of every request."""
    outcomes: Counter[str] = Counter()
    lock = threading.Lock()
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(timeout=10) as http:
            for _ in range(20_000):  # bounded even if stop never came
                if stop.is_set():
                    return
                try:
                    response = http.get(url)
                    outcome = str(response.status_code)
                    if response.status_code != 200:
                        outcome += " " + response.text[:60]
                except httpx.HTTPError as exc:
                    outcome = type(exc).__name__
                with lock:
                    outcomes[outcome] += 1

    threads = [threading.Thread(target=client) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        for upstream, pid in backends:
            time.sleep(0.3)
            os.kill(pid, signal.SIGHUP)
            time.sleep(0.7)  # warm-up is 0.5 s: the next restart starts after it
            wait_warm(upstream)
        time.sleep(0.3)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    return outcomes


@pytest.mark.parametrize("engine", ["httptools", "wsgi"])
def test_a_rolling_restart_of_gunicorn_loses_no_get(serve, engine, tmp_path, record_property):
    (tmp_path / "warming.py").write_text(WARMING_APP)
    with gunicorn(tmp_path) as first, gunicorn(tmp_path) as second:
        results = {}
        for on_status in ([], [502, 503]):
            server, _ = balanced(
                serve,
                [first[0], second[0]],
                engine=engine,
                strip_prefix=True,
                pool={
                    "retries": {"attempts": 3, "budget_percent": 100, "on_status": on_status},
                    # A warming worker's 503 is retried, not held against
                    # its backend: ejected for 30 s, it would leave the
                    # other backend alone to face its own restart.
                    "outlier_detection": {"failure_statuses": "500-502,504-599"},
                },
            )
            results[bool(on_status)] = load_through_restarts(f"{server.url}/api/", [first, second])
    without, with_retries = results[False], results[True]
    record_property("without_on_status", dict(without))
    record_property("with_on_status", dict(with_retries))
    print(f"\nrolling restart ({engine}): without on_status {dict(without)}")
    print(f"rolling restart ({engine}): with on_status {dict(with_retries)}")
    assert sum(with_retries.values()) > 100, "too few requests to judge"
    assert set(with_retries) == {"200"}, with_retries
    # The restarts are real: without on_status the warming workers' 503s get through.
    assert sum(n for outcome, n in without.items() if outcome.startswith("503")) > 0, without
