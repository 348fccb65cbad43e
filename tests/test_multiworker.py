"""Four uvicorn workers sharing a Redis store act as one balancer."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import free_port
from tests.upstreams import complete_lifespan

ROOT = Path(__file__).parent.parent
WORKERS = 4
INTERVAL = 0.5


class Counting:
    """An upstream that counts the health probes it gets, and can fail."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.probes: list[float] = []
        self.fail = False

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await complete_lifespan(receive, send)
            return
        if scope["path"] == "/healthz":
            self.probes.append(time.monotonic())
            status = 200
        else:
            status = 500 if self.fail else 200
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": self.name.encode()})

    def probes_since(self, start: float) -> int:
        return sum(1 for t in self.probes if t >= start)


@pytest.fixture
def counted(serve) -> list[tuple[Counting, Any]]:
    apps = [Counting(name) for name in ("a", "b")]
    return [(app, serve(app)) for app in apps]


def write_config(tmp_path: Path, store: str, backends: list[str]) -> Path:
    path = tmp_path / "balancekit.toml"
    listed = ", ".join(f'"{u}"' for u in backends)
    path.write_text(
        f'store = "{store}"\n'
        f"[pools.api]\nbackends = [{listed}]\n"
        f'health_check = {{ type = "http", path = "/healthz", interval = {INTERVAL}, '
        "fall = 2, rise = 1 }\n"
        "outlier_detection = { consecutive_failures = 2, base_ejection_time = 30 }\n"
        '[[routes]]\nprefix = "/api/"\npool = "api"\n'
    )
    return path


class Workers:
    def __init__(self, url: str, process: subprocess.Popen[str]) -> None:
        self.url = url
        self.process = process

    def whoami(self) -> dict[str, Any]:
        # a new connection each time, so the kernel spreads them over workers
        return httpx.get(self.url + "/whoami", timeout=5).json()

    def all_agree(self, check: Callable[[dict[str, Any]], bool], timeout: float) -> float:
        """Seconds until every worker's view passes ``check`` (fails after ``timeout``)."""
        started = time.monotonic()
        passed: set[int] = set()
        seen: set[int] = set()
        while True:
            elapsed = time.monotonic() - started
            assert elapsed < timeout, f"{len(passed)} of {len(seen)} workers after {elapsed:.2f}s"
            report = self.whoami()
            seen.add(report["pid"])
            if check(report["status"]["pools"]["api"]):
                passed.add(report["pid"])
            else:
                passed.discard(report["pid"])
            if len(passed) >= WORKERS:
                return time.monotonic() - started


@contextmanager
def workers(config: Path) -> Iterator[Workers]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "tests.multiworker_app:app"]
        + ["--workers", str(WORKERS), "--port", str(port), "--no-proxy-headers"]
        + ["--log-level", "warning"],
        cwd=ROOT,
        env={**os.environ, "BALANCEKIT_CONFIG": str(config)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    running = Workers(f"http://127.0.0.1:{port}", process)
    try:
        deadline = time.monotonic() + 30
        pids: set[int] = set()
        while len(pids) < WORKERS:  # every worker up and answering
            assert time.monotonic() < deadline, f"workers answering: {pids}"
            try:
                pids.add(running.whoami()["pid"])
            except httpx.HTTPError:
                assert process.poll() is None, process.communicate()[1]
                time.sleep(0.1)
        yield running
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()


def probes_per_interval(counted, seconds: float) -> list[float]:
    start = time.monotonic()
    time.sleep(seconds)
    return [app.probes_since(start) / (seconds / INTERVAL) for app, _ in counted]


def test_health_probes_are_shared_one_per_backend_per_interval(
    counted, redis_url, tmp_path
) -> None:
    backends = [server.url for _, server in counted]
    with workers(write_config(tmp_path, "memory://", backends)):
        time.sleep(1)
        alone = probes_per_interval(counted, 4)
    (tmp_path / "balancekit.toml").unlink()
    with workers(write_config(tmp_path, redis_url, backends)):
        time.sleep(1)
        shared = probes_per_interval(counted, 4)
    print(f"\nprobes per backend per interval, {WORKERS} workers: {alone} alone, {shared} shared")
    assert min(alone) >= WORKERS * 0.75, "without coordination every worker probes"
    assert max(shared) <= 1.2
    assert min(shared) >= 0.7, "with coordination the probes still happen"


def test_a_drain_through_one_worker_reaches_all_within_a_second(
    counted, redis_url, tmp_path
) -> None:
    backends = [server.url for _, server in counted]
    with workers(write_config(tmp_path, redis_url, backends)) as running:
        target = backends[1]
        httpx.post(f"{running.url}/admin/drain?url={target}")
        took = running.all_agree(lambda pool: pool["backends"][1]["state"] == "draining", 5)
        print(f"\ndrain seen by all {WORKERS} workers after {took:.3f}s")
        assert took <= 1.0
        replies = {httpx.get(f"{running.url}/api/x").text for _ in range(12)}
        assert replies == {"a"}
        # a change whose message was missed heals with the next reconcile
        import redis

        client = redis.Redis.from_url(redis_url)
        state = '{"exists": true, "weight": 3, "backup": false, "enabled": true, "draining": false}'
        client.hset("balancekit:admin:api", target, state)
        client.close()
        took = running.all_agree(
            lambda pool: (
                pool["backends"][1]["state"] == "healthy" and pool["backends"][1]["weight"] == 3
            ),
            6,
        )
        print(f"missed change healed in all workers after {took:.3f}s")


def test_an_ejection_in_one_worker_ejects_everywhere(counted, redis_url, tmp_path) -> None:
    backends = [server.url for _, server in counted]
    bad = counted[1][0]
    with workers(write_config(tmp_path, redis_url, backends)) as running:
        bad.fail = True
        deadline = time.monotonic() + 10
        failures = 0
        while True:  # new connections: the requests spread over the workers
            assert time.monotonic() < deadline
            if httpx.get(f"{running.url}/api/x").status_code == 500:
                failures += 1
            report = running.whoami()["status"]["pools"]["api"]
            if report["backends"][1]["state"] == "ejected":
                break
        took = running.all_agree(lambda pool: pool["backends"][1]["state"] == "ejected", 3)
        print(f"\nejected after {failures} failures; all workers agree after {took:.3f}s")
        assert failures <= WORKERS * 1 + 1  # consecutive_failures = 2 in one worker
        assert {httpx.get(f"{running.url}/api/x").text for _ in range(8)} == {"a"}


def test_checks_go_on_when_a_worker_dies(counted, redis_url, tmp_path) -> None:
    backends = [server.url for _, server in counted]
    with workers(write_config(tmp_path, redis_url, backends)) as running:
        time.sleep(1)
        victim = running.whoami()["pid"]
        os.kill(victim, signal.SIGKILL)
        time.sleep(INTERVAL * 2)  # its leases lapse
        after = probes_per_interval(counted, 3)
        print(f"\nprobes per backend per interval after a worker died: {after}")
        assert min(after) >= 0.7
