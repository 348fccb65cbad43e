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
        #: The last pool view each worker (by pid) reported.
        self.views: dict[int, dict[str, Any]] = {}

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
            self.views[report["pid"]] = report["status"]["pools"]["api"]
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
        start_new_session=True,  # its workers too can be ended, by process group
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
            os.killpg(process.pid, signal.SIGKILL)  # the group we started
            process.communicate(timeout=10)
            raise AssertionError("uvicorn did not shut down within 20 s") from None


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
        asked = time.time()
        httpx.post(f"{running.url}/admin/drain?url={target}")
        running.all_agree(lambda pool: pool["backends"][1]["state"] == "draining", 5)
        # When each worker changed state, by its own status (asking until a
        # new connection lands on every worker adds its own delay).
        changed = [view["backends"][1]["state_since"] for view in running.views.values()]
        took = max(changed) - asked
        print(f"\ndrain applied by all {WORKERS} workers after {took:.3f}s")
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


def connections_to_distinct_workers(url: str, count: int) -> list[httpx.Client]:
    """Keep-alive clients, each held by a different worker."""
    clients: dict[int, httpx.Client] = {}
    deadline = time.monotonic() + 10
    while len(clients) < count:
        assert time.monotonic() < deadline
        client = httpx.Client(base_url=url)
        pid = client.get("/whoami").json()["pid"]
        if pid in clients:
            client.close()
        else:
            clients[pid] = client
    return list(clients.values())


def fail_once(client: httpx.Client) -> None:
    """One request of this worker's round robin that lands on the bad backend."""
    for _ in range(2):
        if client.get("/api/x").status_code == 500:
            return
    raise AssertionError("round robin never reached the failing backend")


@pytest.mark.parametrize("shared", [True, False], ids=["redis", "memory"])
def test_failures_in_different_workers_add_up_to_one_ejection(
    counted, redis_url, tmp_path, shared
) -> None:
    backends = [server.url for _, server in counted]
    store = redis_url if shared else "memory://"
    with workers(write_config(tmp_path, store, backends)) as running:
        first, second = connections_to_distinct_workers(running.url, 2)
        try:
            counted[1][0].fail = True
            fail_once(first)  # consecutive_failures = 2: one failure in each of
            fail_once(second)  # two workers is a streak of two for the balancer
            if not shared:  # each worker alone counts one failure: no ejection
                time.sleep(0.5)
                views = [c.get("/whoami").json()["status"]["pools"]["api"] for c in (first, second)]
                assert [v["backends"][1]["state"] for v in views] == ["healthy", "healthy"]
                return
            took = running.all_agree(lambda pool: pool["backends"][1]["state"] == "ejected", 3)
        finally:
            first.close()
            second.close()
        print(f"\nejected by 2 failures in 2 workers; all {WORKERS} agree after {took:.3f}s")
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
