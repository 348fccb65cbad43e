"""A fault campaign: steady load through a balancer while one backend of
three misbehaves behind a :class:`~tests.fault_relay.FaultRelay`.

Run through ``balancekit serve``'s lean server and through the ASGI
middleware under uvicorn. What must hold: no idempotent request fails
while a fault leaves it retriable; a POST whose request reached a backend
is never sent to another; a black-holed backend is ejected; once the front
stops, every descriptor and upstream connection it took is given back.
``pytest -s`` prints the figures. ``BALANCEKIT_SOAK=100000`` adds the
memory soak (RSS before and after that many requests through serve).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from balancekit._types import Receive, Scope, Send
from balancekit.asgi import BalanceMiddleware
from tests.conftest import LeanServerThread, ServerThread
from tests.fault_relay import FaultRelay
from tests.upstreams import make_echo_app

CLIENTS = 4


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


async def _not_found(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    await send({"type": "http.response.start", "status": 404, "headers": []})
    await send({"type": "http.response.body", "body": b""})


@pytest.fixture
def backends(serve: Callable[..., Any]) -> Iterator[tuple[list[Any], list[FaultRelay]]]:
    apps = [make_echo_app(name) for name in "abc"]
    servers = [serve(app) for app in apps]
    relays = [FaultRelay(server.port) for server in servers]
    yield apps, relays
    for relay in relays:
        relay.close()


def _front(
    kind: str, relays: list[FaultRelay], *, eject: bool = False
) -> tuple[BalanceMiddleware, Any]:
    """A balancer over ``relays``; ``eject``: with outlier detection (else
    every third request keeps meeting the faulty backend)."""
    config: dict[str, Any] = {
        "pools": {
            "api": {
                "backends": [relay.url for relay in relays],
                "algorithm": "round_robin",
                "retries": {"attempts": 3, "budget_percent": 100},
                "timeouts": {"connect": 0.5, "read": 0.5},
            }
        },
        "routes": [{"prefix": "/api/", "pool": "api"}],
    }
    if eject:
        config["pools"]["api"]["outlier_detection"] = {"consecutive_failures": 3}
    app = BalanceMiddleware(_not_found, config=config)
    server = LeanServerThread(app) if kind == "lean" else ServerThread(app)
    return app, server.start()


def _load(url: str, count: int, method: str = "GET") -> list[tuple[str, int | str]]:
    """``count`` requests from CLIENTS threads; (path, status or error)."""

    def one(client: httpx.Client, i: int) -> tuple[str, int | str]:
        path = f"/api/{method.lower()}/{i}-{time.monotonic_ns()}"
        try:
            response = client.request(
                method, url + path, content=b"x" * 100 if method == "POST" else None
            )
            return path, response.status_code
        except httpx.HTTPError as exc:
            return path, type(exc).__name__

    with httpx.Client(timeout=10) as client, ThreadPoolExecutor(CLIENTS) as pool:
        return list(pool.map(lambda i: one(client, i), range(count)))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["lean", "uvicorn"])
def test_faults_under_load(kind: str, backends) -> None:
    apps, relays = backends
    bad = relays[0]
    fds_before = _fds()
    figures: dict[str, Any] = {}
    app, server = _front(kind, relays)
    try:
        _load(server.url, 30)  # warm: every backend has pooled connections
        for mode in ("reset", "close", "latency", "trickle"):
            bad.mode, bad.after, bad.delay = mode, 0, 0.002
            taken = bad.received
            results = _load(server.url, 90)
            failed = [r for r in results if r[1] != 200]
            figures[f"failed GETs, {mode}"] = len(failed)
            assert bad.received > taken  # the faulty backend had its share
            # Goal 0. Seen here: about one run in three loses one GET of
            # ~360 to a 502 "upstream closed the connection" under reset or
            # close (issue 16's note); more than that is a regression.
            assert len(failed) <= 1, (mode, failed[:5])
        # POSTs: one that reached the bad backend is answered 502, never replayed.
        bad.mode = "reset"
        results = _load(server.url, 60, "POST")
        served = [path for a in apps for path in a.seen]
        replayed = [path for path, _ in results if served.count(path) > 1]
        figures["POSTs 502 (reset after the request went out)"] = sum(
            status == 502 for _, status in results
        )
        figures["POSTs sent to two backends"] = len(replayed)
        assert replayed == []
        assert figures["POSTs 502 (reset after the request went out)"] > 0
        assert {status for _, status in results} <= {200, 502}
    finally:
        server.stop()
    # Black-holed: connections open, answers never come; outlier detection
    # ejects it after three read timeouts, and its GETs are retried meanwhile.
    bad.mode = "blackhole"
    app, server = _front(kind, relays, eject=True)
    try:
        bad_backend = app.balancer.pools["api"].backend(bad.url)
        started = time.monotonic()
        failed_gets = 0
        while bad_backend.state.value != "ejected" and time.monotonic() - started < 20:
            failed_gets += sum(status != 200 for _, status in _load(server.url, 8))
        figures["time to eject a black-holed backend (s)"] = round(time.monotonic() - started, 2)
        figures["failed GETs, blackhole"] = failed_gets
        assert bad_backend.state.value == "ejected"
        assert failed_gets == 0
        bad.mode = "pass"
        assert all(status == 200 for _, status in _load(server.url, 30))
    finally:
        server.stop()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and (sum(r.open for r in relays) or _fds() > fds_before):
        time.sleep(0.05)
    figures["upstream connections left after stop"] = sum(r.open for r in relays)
    figures["descriptors before/after"] = (fds_before, _fds())
    print(f"\nfault campaign through {kind}:", figures)
    assert sum(r.open for r in relays) == 0
    assert _fds() <= fds_before


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("BALANCEKIT_SOAK"),
    reason="a soak: BALANCEKIT_SOAK=N runs N requests (about 150 a second here)",
)
def test_memory_over_many_requests_through_serve(backends) -> None:
    _, relays = backends
    count = int(os.environ["BALANCEKIT_SOAK"])
    _, server = _front("lean", relays)
    try:
        _load(server.url, 2_000)  # caches, pools and allocator arenas settle first
        before = _rss_mb()
        results = _load(server.url, count)
        after = _rss_mb()
    finally:
        server.stop()
    print(f"\nRSS over {count} requests: {before:.1f} -> {after:.1f} MB")
    assert all(status == 200 for _, status in results)
    assert after - before < 5
