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
