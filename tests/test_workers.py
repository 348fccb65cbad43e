"""``balancekit serve --workers N``: the real command, its real workers, a
real Redis between them; which worker holds a connection is read from
/proc, not asked of balancekit."""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from balancekit._supervisor import BACKOFF_FIRST, BACKOFF_MAX, backoff
from tests.conftest import free_port
from tests.test_commands import Running, run, started, wait_until_serving

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/task").is_dir(), reason="reads worker connections from Linux's /proc"
)


def children(pid: int) -> set[int]:
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        with open(task / "children") as listing:
            found.update(int(child) for child in listing.read().split())
    return found


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def owner_of(client: socket.socket, workers: set[int]) -> int | None:
    """The worker holding the server side of ``client``'s connection."""
    client_port = client.getsockname()[1]
    server_port = client.getpeername()[1]
    inode = None
    with open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            local, remote = fields[1], fields[2]
            if (
                int(local.split(":")[1], 16) == server_port
                and int(remote.split(":")[1], 16) == client_port
            ):
                inode = fields[9]
    for pid in workers:
        if inode in _socket_inodes(pid):
            return pid
    return None


def get(sock: socket.socket, path: str = "/x") -> bytes:
    """One request on a kept-alive raw connection; the response's body."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
    response = http.client.HTTPResponse(sock)
    response.begin()
    assert response.status == 200
    return response.read()


class Load:
    """GETs from ``threads`` kept-alive connections until stopped (or for
    ``limit`` seconds at most). A failed request is counted, and its
    connection made again, as a client would."""

    def __init__(self, port: int, threads: int = 4, limit: float = 30.0) -> None:
        self.port = port
        self.ok = 0
        self.failed: list[str] = []
        self.bodies: list[bytes] = []
        self._stop = threading.Event()
        self._deadline = time.monotonic() + limit
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run) for _ in range(threads)]

    def _run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        while not self._stop.is_set() and time.monotonic() < self._deadline:
            try:
                conn.request("GET", "/x")
                response = conn.getresponse()
                body = response.read()
                ok = response.status == 200
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                with self._lock:
                    self.failed.append(repr(exc))
                continue
            with self._lock:
                if ok:
                    self.ok += 1
                    self.bodies.append(body)
                else:
                    self.failed.append(f"status {response.status}")
        conn.close()

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=15)

    def since(self, count: int) -> int:
        """Requests answered after the first ``count``."""
        return self.ok - count


def config_for(path: Path, redis_url: str, upstream: Any, **pool: str) -> None:
    extra = "".join(f"{key} = {value}\n" for key, value in pool.items())
    path.write_text(
        f'store = "{redis_url}"\n'
        f'[pools.api]\nbackends = ["{upstream.url}"]\n{extra}'
        '[[routes]]\nprefix = "/"\npool = "api"\n'
    )


@pytest.fixture(params=["balancekit"])
def two_workers(request, upstreams, redis_url, tmp_path) -> Iterator[tuple[Running, int, Path]]:
    """``serve --workers 2`` over Redis, on the server the param names."""
    config = tmp_path / "balancekit.toml"
    config_for(config, redis_url, upstreams[0])
    port = free_port()
    args = ["--port", str(port), "--workers", "2", "--server", request.param]
    with started("serve", str(config), *args) as running:
        running.wait_for("2 workers")
        wait_until_serving(f"http://127.0.0.1:{port}/")
        wait_for_workers(running, 2)
        yield running, port, config


def wait_for_workers(
    running: Running, count: int, other_than: frozenset[int] | set[int] = frozenset()
) -> set[int]:
    deadline = time.monotonic() + 15
    while True:
        pids = children(running.process.pid)
        if len(pids) == count and not pids & other_than:
            return pids
        assert time.monotonic() < deadline, (pids, running.lines)
        time.sleep(0.05)


@pytest.mark.parametrize("two_workers", ["balancekit", "uvicorn"], indirect=True)
def test_both_workers_answer_on_one_port(two_workers) -> None:
    running, port, _ = two_workers
    workers = children(running.process.pid)
    owners: set[int | None] = set()
    clients = []
    try:
        for _ in range(40):
            client = socket.create_connection(("127.0.0.1", port))
            clients.append(client)
            assert b'"backend": "a"' in get(client)
            owners.add(owner_of(client, workers))
            if owners == workers:
                break
    finally:
        for client in clients:
            client.close()
    assert owners == workers  # two distinct processes, each answering
    assert running.stop(signal.SIGTERM) == 0


def test_a_killed_worker_comes_back_and_the_port_keeps_answering(two_workers) -> None:
    running, port, _ = two_workers
    workers = children(running.process.pid)
    victim = min(workers)
    with Load(port, threads=4) as load:
        while load.ok < 200:
            time.sleep(0.01)
        os.kill(victim, signal.SIGKILL)
        killed_at = load.ok
        replacements = wait_for_workers(running, 2, other_than={victim})
        while load.since(killed_at) < 400:
            assert not running.process.poll(), running.lines
            time.sleep(0.01)
    assert replacements - workers  # a new worker took the dead one's place
    running.wait_for("killed by SIGKILL; starting another in 0.0 s")
    # Only requests on connections the dead worker held can fail (each
    # client's next request on one); the port itself never stopped answering.
    assert len(load.failed) <= 4, load.failed
    print(f"\nSIGKILL under load: {load.ok} answered, {len(load.failed)} failed: {load.failed}")
    assert running.stop(signal.SIGTERM) == 0


def test_sigterm_lets_every_workers_requests_finish(two_workers) -> None:
    running, port, _ = two_workers
    workers = children(running.process.pid)
    answers: list[bytes] = []

    def slow(client: socket.socket) -> None:
        answers.append(get(client, "/sleep?s=1"))

    # Connections until both workers hold one, then a slow request on each.
    clients: dict[int | None, socket.socket] = {}
    spare = []
    while len(clients) < 2:
        client = socket.create_connection(("127.0.0.1", port))
        get(client)
        owner = owner_of(client, workers)
        if owner in clients:
            spare.append(client)
        else:
            clients[owner] = client
        assert len(spare) < 40
    requests = [threading.Thread(target=slow, args=(c,)) for c in clients.values()]
    for thread in requests:
        thread.start()
    time.sleep(0.3)  # both in flight
    assert running.stop(signal.SIGTERM) == 0
    for thread in requests:
        thread.join(timeout=10)
    assert len(answers) == 2
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers)
    assert "balancekit stopped" in running.lines
    for client in [*clients.values(), *spare]:
        client.close()


def test_sighup_reloads_every_worker_and_a_bad_file_none(two_workers, upstreams, redis_url) -> None:
    running, port, config = two_workers
    with Load(port, threads=4) as load:
        while load.ok < 100:
            time.sleep(0.01)
        config_for(config, redis_url, upstreams[1])
        running.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while sum(line.startswith("worker") and "reloaded" in line for line in running.lines) < 2:
            assert time.monotonic() < deadline, running.lines
            time.sleep(0.05)
        reloaded_at = len(load.bodies)
        while load.since(reloaded_at) < 200:
            time.sleep(0.01)
        config.write_text('[[routes]]\nprefix = "/"\npool = "gone"\n')
        running.process.send_signal(signal.SIGHUP)
        running.wait_for("the running configuration stays")
        broken_at = load.ok
        while load.since(broken_at) < 200:
            time.sleep(0.01)
    assert load.failed == []  # no request lost to either reload
    after = load.bodies[reloaded_at + 8 :]  # each connection's request in flight may be old
    assert after and all(b'"backend": "b"' in body for body in after)
    # The supervisor checked the broken file once and told no worker.
    assert sum("refused" in line for line in running.lines) == 1
    assert running.stop(signal.SIGTERM) == 0


def test_a_sighup_while_workers_start_waits_for_them(upstreams, redis_url, tmp_path) -> None:
    config = tmp_path / "balancekit.toml"
    config_for(config, redis_url, upstreams[0])
    port = free_port()
    with started("serve", str(config), "--port", str(port), "--workers", "2") as running:
        running.wait_for("2 workers")
        running.process.send_signal(signal.SIGHUP)  # the workers are still importing
        deadline = time.monotonic() + 15
        while sum(line.startswith("worker") and "reloaded" in line for line in running.lines) < 2:
            assert time.monotonic() < deadline, running.lines
            time.sleep(0.05)
        assert not any("killed by" in line for line in running.lines), running.lines
        assert running.stop(signal.SIGTERM) == 0


def test_a_worker_started_after_a_reload_serves_the_reloaded_file(
    two_workers, upstreams, redis_url
) -> None:
    running, port, config = two_workers
    config_for(config, redis_url, upstreams[1])
    running.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while sum(line.startswith("worker") and "reloaded" in line for line in running.lines) < 2:
        assert time.monotonic() < deadline, running.lines
        time.sleep(0.05)
    workers = children(running.process.pid)
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    wait_for_workers(running, 2, other_than=workers)
    wait_until_serving(f"http://127.0.0.1:{port}/")
    for _ in range(10):
        with socket.create_connection(("127.0.0.1", port)) as client:
            assert b'"backend": "b"' in get(client)
    assert running.stop(signal.SIGTERM) == 0


def test_workers_stop_when_the_supervisor_is_killed(two_workers) -> None:
    running, _, _ = two_workers
    workers = children(running.process.pid)
    running.process.kill()
    running.process.wait(timeout=10)
    deadline = time.monotonic() + 15
    while any(Path(f"/proc/{pid}").exists() for pid in workers):
        assert time.monotonic() < deadline, "workers outlived their supervisor"
        time.sleep(0.05)


def test_several_workers_need_a_shared_store(upstreams, tmp_path) -> None:
    refused = run(
        "serve", "--backend", upstreams[0].url, "--port", str(free_port()), "--workers", "2"
    )
    assert refused.returncode == 2
    assert "--workers 2 needs a shared store" in refused.stderr
    assert "each worker would keep its own health checks" in refused.stderr
    zero = run("serve", "--backend", upstreams[0].url, "--workers", "0")
    assert zero.returncode == 2
    assert "--workers" in zero.stderr and "0 is not in the range x>=1" in zero.stderr


def test_a_worker_that_keeps_crashing_is_restarted_ever_more_slowly() -> None:
    # The supervisor alone, around a worker that dies at once.
    script = textwrap.dedent(
        """
        import sys
        from balancekit._supervisor import Supervisor
        supervisor = Supervisor(1, lambda: 3, reload=lambda: False, say=print)
        sys.exit(supervisor.run())
        """
    )
    process = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    running = Running(process)
    try:
        running.wait_for("starting another in 2.0 s", timeout=10)
        assert running.stop(signal.SIGTERM) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        assert process.stdout is not None
        process.stdout.close()
    delays = [line.rsplit(" in ", 1)[1] for line in running.lines if "exited with status 3" in line]
    assert delays[:4] == ["0.0 s", "0.5 s", "1.0 s", "2.0 s"]


def test_backoff_doubles_up_to_its_limit() -> None:
    assert backoff(0) == backoff(1) == 0.0
    assert backoff(2) == BACKOFF_FIRST
    assert backoff(3) == 2 * BACKOFF_FIRST
    assert backoff(50) == BACKOFF_MAX
