"""A backend killed under steady load, restarted, and the pool changed under load.

The backends are real processes (uvicorn serving the echo app) so that a
kill is a SIGKILL: connections reset, the port refuses, nothing says
goodbye. Load comes from client threads sending GETs through a real
balancer for a few seconds. The figures (requests sent, failed, time to
eject, time to recover) are printed; run with ``-s`` to see them.
"""

from __future__ import annotations

import gc
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest

from balancekit import Balancer
from balancekit.asgi import BalanceMiddleware
from tests.conftest import free_port
from tests.helpers import app_fallback

ROOT = Path(__file__).resolve().parent.parent
INTERVAL, TIMEOUT, FALL, RISE = 0.2, 0.5, 2, 2


class BackendProcess:
    """The echo app under uvicorn in a process of its own, on a fixed port."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        code = (
            "import uvicorn; from tests.upstreams import make_echo_app; "
            f"uvicorn.run(make_echo_app({self.name!r}), host='127.0.0.1', port={self.port}, "
            "log_level='warning', lifespan='off')"
        )
        self.process = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT)
        deadline = time.monotonic() + 15
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                assert self.process.poll() is None, f"backend {self.name} exited"
                assert time.monotonic() < deadline, f"backend {self.name} did not start"
                time.sleep(0.05)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)


@pytest.fixture
def processes() -> Any:
    started: list[BackendProcess] = []

    def make(name: str) -> BackendProcess:
        backend = BackendProcess(name)
        backend.start()
        started.append(backend)
        return backend

    yield make
    for backend in started:
        backend.kill()


class Load:
    """Client threads sending GETs until stopped; every answer is recorded."""

    def __init__(self, url: str, threads: int = 4, limit: float = 20.0) -> None:
        self.url = url
        self.results: list[tuple[float, int, str]] = []  # (time, status, backend)
        self._stop = threading.Event()
        self._limit = limit  # a hard stop, whatever happens to the test
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]
        self._lock = threading.Lock()

    def _run(self) -> None:
        deadline = time.monotonic() + self._limit
        with httpx.Client(timeout=5) as client:
            while not self._stop.is_set() and time.monotonic() < deadline:
                try:
                    response = client.get(self.url + "/load")
                    status, backend = response.status_code, response.headers.get("x-backend", "")
                    if status == 200:
                        backend = response.json()["backend"]
                except httpx.HTTPError as exc:
                    status, backend = 0, type(exc).__name__
                with self._lock:
                    self.results.append((time.monotonic(), status, backend))

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=10)

    def served_by(self, name: str, after: float, before: float = float("inf")) -> int:
        return sum(1 for t, s, b in self.results if b == name and after <= t < before)


def wait_for(predicate: Any, timeout: float = 10.0) -> float:
    """Seconds until ``predicate()`` holds, polled every 10 ms."""
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < timeout, "condition not reached in time"
        time.sleep(0.01)
    return time.monotonic()


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_a_killed_backend_leaves_and_returns_without_a_failed_request(
    processes, serve, transport
) -> None:
    a, b, c = processes("a"), processes("b"), processes("c")
    fds_before = open_fds()
    balancer = Balancer(
        {
            "transport": transport,
            "pools": {
                "api": {
                    "backends": [a.url, b.url, c.url],
                    # Room for every refused GET to be retried: with four
                    # clients all on b at once, the default budget (a floor
                    # of 3) could refuse a fourth retry; the budget has its
                    # own tests.
                    "retries": {"attempts": 3, "budget_percent": 100},
                    "health_check": {
                        "type": "http",
                        "path": "/healthz",
                        "interval": INTERVAL,
                        "timeout": TIMEOUT,
                        "fall": FALL,
                        "rise": RISE,
                    },
                }
            },
            "routes": [{"prefix": "/", "pool": "api"}],
        }
    )
    proxy = serve(BalanceMiddleware(app_fallback, balancer=balancer), lifespan="on")
    pool = balancer.pools["api"]
    state = lambda backend: pool.backend(backend.url).state.value  # noqa: E731

    with Load(proxy.url) as load:
        wait_for(lambda: load.served_by("b", 0) > 20)
        killed = time.monotonic()
        b.kill()
        ejected = wait_for(lambda: state(b) == "unhealthy")
        time.sleep(0.5)  # traffic with b out of the pool
        b.start()
        restarted = time.monotonic()  # listening again
        recovered = wait_for(lambda: state(b) == "healthy")
        wait_for(lambda: load.served_by("b", recovered) > 20)

        # The pool changes under load: one backend added, one removed.
        d = processes("d")
        pool.add_backend(d.url)
        wait_for(lambda: load.served_by("d", 0) > 20)
        pool.remove_backend(a.url)
        removed = time.monotonic()
        wait_for(lambda: load.served_by("c", removed) > 20)

    results = load.results
    # A SIGKILL can land between a response's head and its body: the client
    # has the head by then, so that response can only be cut short (a
    # protocol error at the client, as under NGINX). At most one per client
    # in flight; anything else (a 5xx, a refused connection) is a failure.
    cut = [r for r in results if r[2] == "RemoteProtocolError"]
    assert len(cut) <= 4, f"{len(cut)} responses cut short"
    failed = [r for r in results if r[1] != 200 and r not in cut]
    print(
        f"\n[{transport}] kill under load: {len(results)} requests, {len(failed)} failed; "
        f"b ejected {ejected - killed:.2f}s after the kill "
        f"(bound fall x interval + timeout = {FALL * INTERVAL + TIMEOUT:.2f}s), "
        f"back {recovered - restarted:.2f}s after restart "
        f"(rise x interval = {RISE * INTERVAL:.2f}s); "
        f"served by: {dict(Counter(r[2] for r in results))}"
    )
    assert not failed, f"failed requests: {Counter((s, b) for _, s, b in failed)}"
    assert ejected - killed < FALL * INTERVAL + TIMEOUT + 0.3  # scheduling slack
    assert recovered - restarted < RISE * INTERVAL + INTERVAL + 0.3  # plus a check's phase
    assert load.served_by("b", ejected + TIMEOUT, restarted) == 0
    assert load.served_by("a", removed + 0.2) == 0  # removed: no new requests after

    # Shutdown leaves nothing behind: no health-check socket, no other one.
    proxy.stop()
    gc.collect()
    leaked = open_fds() - fds_before
    assert not leaked, f"descriptors left open: {leaked}"
