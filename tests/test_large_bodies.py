"""50 MB each way through a real `balancekit serve` process, with its memory watched."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port
from tests.upstreams import MB

pytestmark = pytest.mark.slow


def _kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


@pytest.fixture
def balancer_process(upstreams, transport) -> Iterator[tuple[str, int]]:
    port = free_port()
    config = Path(f"/tmp/balancekit-test-{port}.toml")
    config.write_text(
        f'transport = "{transport}"\n[pools.big]\nbackends = ["{upstreams[0].url}"]\n'
        '[[routes]]\nprefix = "/"\npool = "big"\n'
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "balancekit", "serve", str(config), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert f"127.0.0.1:{port}" in line, line
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 10
        while True:
            try:
                httpx.get(url + "/echo")
                break
            except httpx.ConnectError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        yield url, process.pid
    finally:
        process.terminate()
        process.wait(timeout=10)
        if process.stdout is not None:
            process.stdout.close()
        config.unlink()


def test_50_mb_download_and_upload_stream_with_flat_memory(balancer_process) -> None:
    url, pid = balancer_process
    with httpx.Client(timeout=60) as client:
        for _ in range(3):  # warm up: pools, buffers, code paths
            client.get(url + "/big?mb=1").raise_for_status()
            client.post(url + "/echo", content=b"x" * MB).raise_for_status()
        baseline = _kb(pid, "VmHWM")

        received = 0
        with client.stream("GET", url + "/big?mb=50") as response:
            for chunk in response.iter_raw():
                received += len(chunk)
        assert received == 50 * MB

        digest = hashlib.sha256()

        def upload() -> Iterator[bytes]:
            block = bytes(range(256)) * 1024
            for _ in range(200):  # 200 x 256 KiB = 50 MiB
                digest.update(block)
                yield block

        echoed = client.post(url + "/echo", content=upload()).json()
        assert echoed["body_size"] == 50 * MB
        assert echoed["body_sha256"] == digest.hexdigest()
    growth_mb = (_kb(pid, "VmHWM") - baseline) / 1024
    assert growth_mb < 20, f"the balancer's peak memory grew by {growth_mb:.1f} MB"
