"""The example projects run as documented, against real backends."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx

from tests.conftest import free_port

EXAMPLES = Path(__file__).parent.parent / "example_projects"


def test_fastapi_example(upstreams, tmp_path: Path) -> None:
    config = tmp_path / "balancekit.toml"
    original = (EXAMPLES / "fastapi_app" / "balancekit.toml").read_text()
    config.write_text(
        original.replace("http://127.0.0.1:9001", upstreams[0].url).replace(
            "http://127.0.0.1:9002", upstreams[1].url
        )
    )
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "app:app", "--port", str(port), "--no-proxy-headers"],
        cwd=EXAMPLES / "fastapi_app",
        env={**os.environ, "BALANCEKIT_CONFIG": str(config)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                home = httpx.get(url + "/")
                break
            except httpx.ConnectError:
                assert process.poll() is None, process.communicate()[1]
                assert time.monotonic() < deadline
                time.sleep(0.1)
        assert home.json()["app"] == "fastapi example"
        with httpx.Client() as client:
            replies = [client.get(url + "/api/users").json() for _ in range(6)]
        assert {r["path"] for r in replies} == {"/users"}
        assert Counter(r["backend"] for r in replies) == {"a": 2, "b": 4}
        status = httpx.get(url + "/balancekit/status.json").json()
        assert status["pools"]["api"]["algorithm"] == "weighted_round_robin"
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=10)
    # uvicorn ends by raising SIGTERM again once it has shut down cleanly
    assert "Application shutdown complete" in stderr, stderr


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmHWM for {pid}")


def test_flask_example_under_gunicorn_with_two_workers(upstreams, tmp_path: Path) -> None:
    config = tmp_path / "balancekit.toml"
    original = (EXAMPLES / "flask_app" / "balancekit.toml").read_text()
    config.write_text(
        original.replace("http://127.0.0.1:9001", upstreams[0].url).replace(
            "http://127.0.0.1:9002", upstreams[1].url
        )
    )
    port = free_port()
    # --preload: the Balancer is built in the master, before the fork, as
    # many deployments do; each worker must still run its own checks.
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "gunicorn", "--workers", "2", "--threads", "8"),
            *("--worker-class", "gthread", "--preload", "--bind", f"127.0.0.1:{port}"),
            "app:create_app()",
        ],
        cwd=EXAMPLES / "flask_app",
        env={**os.environ, "BALANCEKIT_CONFIG": str(config)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"

    def workers_reporting(healthy_b: bool) -> dict[int, dict]:
        """Each worker's own view of the pool, asked over new connections."""
        views: dict[int, dict] = {}
        deadline = time.monotonic() + 15
        while len(views) < 2:
            assert time.monotonic() < deadline, f"workers seen: {list(views)}"
            report = httpx.get(url + "/workers").json()
            states = [b["state"] for b in report["status"]["pools"]["api"]["backends"]]
            if states == ["healthy", "healthy" if healthy_b else "unhealthy"]:
                views[report["pid"]] = report
            else:
                views.pop(report["pid"], None)
                time.sleep(0.05)
        return views

    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                home = httpx.get(url + "/")
                break
            except httpx.ConnectError:
                assert process.poll() is None, process.communicate()[1]
                assert time.monotonic() < deadline
                time.sleep(0.1)
        assert home.json()["app"] == "flask example"
        with httpx.Client() as client:
            replies = [client.get(url + "/api/users").json() for _ in range(4)]
        assert {r["path"] for r in replies} == {"/users"}
        assert {r["backend"] for r in replies} == {"a", "b"}
        assert httpx.get(url + "/search/q").status_code == 401
        token = {"X-Search-Token": "let-me-search"}
        assert httpx.get(url + "/search/q", headers=token).json()["path"] == "/q"

        pids = list(workers_reporting(healthy_b=True))
        baseline = {pid: peak_rss_mb(pid) for pid in pids}
        # 50 MB up, chunked and with a length, and 50 MB down: memory stays flat.
        size = 50 * 1024 * 1024
        block = b"u" * (1024 * 1024)
        chunked = httpx.post(url + "/api/up", content=iter([block] * 50), timeout=60).json()
        assert chunked["body_size"] == size
        sized = httpx.post(url + "/api/up", content=block * 50, timeout=60).json()
        assert sized["body_size"] == size
        received = 0
        with httpx.stream("GET", url + "/api/big?mb=50", timeout=60) as response:
            for part in response.iter_raw():
                received += len(part)
        assert received == size
        growth = {pid: peak_rss_mb(pid) - baseline[pid] for pid in pids}
        print(f"\nworker peak RSS growth after 3 x 50 MB (MB): {growth}")
        assert max(growth.values()) < 20, f"worker peak RSS grew (MB): {growth}"

        upstreams[1].stop()  # each worker's own checks must notice
        assert len(workers_reporting(healthy_b=False)) == 2
        with httpx.Client() as client:
            after = [client.get(url + "/api/users").json()["backend"] for _ in range(4)]
        assert after == ["a"] * 4
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=20)
    assert "Traceback" not in stderr, stderr
