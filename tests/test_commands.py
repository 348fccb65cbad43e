"""The command line, run as a real subprocess each time."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from balancekit.cli import _bind
from tests.conftest import closed_port_url, free_port


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "balancekit", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


class Running:
    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.process = process
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, text: str, timeout: float = 15) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines:
                if text in line:
                    return line
            assert self.process.poll() is None, "\n".join(self.lines)
            time.sleep(0.05)
        raise AssertionError(f"{text!r} not printed; got {self.lines}")

    def stop(self, sig: int) -> int:
        self.process.send_signal(sig)
        code = self.process.wait(timeout=10)
        self._reader.join(timeout=5)
        return code


@contextmanager
def started(*args: str) -> Iterator[Running]:
    process = subprocess.Popen(
        [sys.executable, "-m", "balancekit", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    running = Running(process)
    try:
        yield running
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
        if process.stdout is not None:
            process.stdout.close()


def wait_until_serving(url: str) -> None:
    deadline = time.monotonic() + 10
    while True:
        try:
            httpx.get(url)
            return
        except httpx.ConnectError:
            assert time.monotonic() < deadline
            time.sleep(0.05)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "sigint"])
def test_serve_backends_round_robin_and_stop_cleanly(upstreams, sig) -> None:
    port = free_port()
    args = ["serve", "--port", str(port)]
    for upstream in upstreams[:2]:
        args += ["--backend", upstream.url]
    with started(*args) as running:
        line = running.wait_for("serving on")
        url = f"http://127.0.0.1:{port}/"
        assert url in line
        wait_until_serving(url + "healthz")
        with httpx.Client() as client:
            seen = Counter(client.get(url + "x").json()["backend"] for _ in range(4))
        assert seen == {"a": 2, "b": 2}
        assert running.stop(sig) == 0
        assert "balancekit stopped" in running.lines


def test_serve_a_config_file(upstreams, tmp_path: Path) -> None:
    config = tmp_path / "balancekit.toml"
    config.write_text(
        f'[pools.api]\nbackends = ["{upstreams[2].url}"]\n'
        '[[routes]]\nprefix = "/api/"\npool = "api"\n'
    )
    port = free_port()
    with started("serve", str(config), "--port", str(port)) as running:
        running.wait_for("serving on")
        url = f"http://127.0.0.1:{port}"
        wait_until_serving(url)
        assert httpx.get(url + "/api/users").json()["backend"] == "c"
        unrouted = httpx.get(url + "/elsewhere")
        assert unrouted.status_code == 404
        assert unrouted.headers["content-type"] == "application/problem+json"
        assert running.stop(signal.SIGTERM) == 0


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        pytest.param(
            '[pools.api]\nbackends = [{ url = "http://127.0.0.1:9", weight = -3 }]\n',
            "pools.api.backends[0].weight: must be a positive integer, got -3",
            id="bad-weight",
        ),
        pytest.param(
            '[pools.api]\nbackendz = ["http://127.0.0.1:9"]\n',
            "pools.api.backendz: unknown key; did you mean 'backends'?",
            id="unknown-key",
        ),
    ],
)
def test_a_bad_config_is_refused_with_its_key_path(tmp_path: Path, toml, message) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(toml)
    for command in ("serve", "check"):
        result = run(command, str(config))
        assert result.returncode == 1
        assert message in result.stderr


def test_check_reports_every_backend(upstreams, tmp_path: Path) -> None:
    config = tmp_path / "balancekit.toml"
    good = f'[pools.api]\nbackends = ["{upstreams[0].url}", "{upstreams[1].url}"]\n'
    config.write_text(good)
    result = run("check", str(config))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[1].split() == ["pool", "backend", "check", "result"]
    assert set(lines[2]) <= {"-", " "}
    assert [line.split()[-1] for line in lines[3:]] == ["ok", "ok"]

    dead = closed_port_url()
    config.write_text(
        f'[pools.api]\nbackends = ["{upstreams[0].url}", "{dead}"]\n'
        '[pools.api.health_check]\ntype = "http"\npath = "/echo"\n'
    )
    result = run("check", str(config))
    assert result.returncode == 1
    rows = {line.split()[1]: line.split()[2:] for line in result.stdout.splitlines()[3:]}
    assert rows == {upstreams[0].url: ["http", "ok"], dead: ["http", "FAILED"]}
    assert "1 of 2 backends failed" in result.stderr


def test_plugins_lists_the_builtins() -> None:
    result = run("plugins")
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines()]
    assert rows[0] == ["kind", "name", "provided", "by"]
    listed = {(row[-2], row[-1]) for row in rows[2:]}
    for name in ("round_robin", "random", "weighted_round_robin", "http", "tcp", "none", "memory"):
        assert (name, "balancekit") in listed


def test_demo_serves_three_backends_and_its_status_page() -> None:
    port = free_port()
    with started("demo", "--port", str(port)) as running:
        url = f"http://127.0.0.1:{port}/"
        running.wait_for(f"balancer:  {url}")
        running.wait_for(f"dashboard: {url}balancekit/")
        wait_until_serving(url + "balancekit/status.json")
        names: set[str] = set()
        with httpx.Client() as client:
            # The demo's own traffic shares the turns (and can fall in step
            # with ours), so ask until every backend has answered.
            for _ in range(200):
                names.add(client.get(url).json()["backend"])
                if len(names) == 3:
                    break
            status = client.get(url + "balancekit/status.json").json()
        assert names == {"fast", "medium", "slow"}
        assert len(status["pools"]["demo"]["backends"]) == 3
        deadline = time.monotonic() + 10
        while True:  # its own traffic keeps the dashboard alive
            status = httpx.get(url + "balancekit/status.json").json()
            served = sum(b["requests_total"] for b in status["pools"]["demo"]["backends"])
            if served > 20:
                break
            assert time.monotonic() < deadline, f"only {served} requests"
            time.sleep(0.2)
        assert running.stop(signal.SIGINT) == 0


def test_version() -> None:
    result = run("--version")
    assert result.returncode == 0
    assert "0.1.0" in result.stdout


def test_serve_listens_on_a_socket_asyncio_will_set_nodelay_on() -> None:
    # asyncio sets TCP_NODELAY only on accepted sockets whose proto is TCP;
    # with proto 0, uvicorn's two writes (headers, then body) met Nagle and
    # every answer waited ~40 ms for the client's delayed ACK.
    with _bind("127.0.0.1", 0) as sock:
        assert sock.proto == socket.IPPROTO_TCP
