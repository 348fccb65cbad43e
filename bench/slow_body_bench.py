"""Does ``request_buffer`` keep slow-body clients off the backend?

Method. One backend (uvicorn + httptools, a raw ASGI app that reads the whole
request body, then answers 100 bytes). In front of it, in turn:

- ``balancekit serve`` with ``request_buffer = 65536`` in the pool,
- ``balancekit serve`` with ``request_buffer = 0`` (every body streams),
- NGINX (one worker, ``proxy_request_buffering on``, its default), when
  installed.

Each target gets a slow-POST attack, ``slowhttptest -B`` (200 connections at
200/s, each announcing an 8,192-byte body, under the 65,536 buffer, and
sending 24 bytes every 5 s, so no body ever completes), for 20 s. Every
second the script counts the ESTABLISHED TCP connections to the backend's
port and to the target's port (from /proc/net/tcp), and a normal request
(a POST of 100 bytes, httpx, 3 s timeout) is sent from a thread of its own
each second. 3 s after slowhttptest has ended the backend connections are
counted again: a proxy that forgot a connection shows it there.

Reported per target: backend connections held (peak and mean over the
attack, and after it), client connections to the target (peak), and the
probes answered 200 with their median and worst latency.

Every server is a subprocess of this script listening on 127.0.0.1 (ephemeral
ports) and is stopped by PID on exit (also on Ctrl-C, SIGTERM or an error).

    .venv/bin/python bench/slow_body_bench.py             # ~80 s
    .venv/bin/python bench/slow_body_bench.py --seconds 10 --connections 100
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "slow_body_bench.json"
BODY = b"x" * 100
ATTACK_BODY = 8192  # Content-Length announced by slowhttptest: under 65536
ESTABLISHED = "01"

Popen = subprocess.Popen[bytes]
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]


# --- the backend (run by uvicorn with --app-dir bench) ------------------------------


async def backend(
    scope: Scope,
    receive: Callable[[], Awaitable[Message]],
    send: Callable[[Message], Awaitable[None]],
) -> None:
    """Read the whole request body, as an application does, then answer."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return
    more = True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        more = message.get("more_body", False)
    headers = [(b"content-type", b"text/plain"), (b"content-length", b"100")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": BODY})


# --- processes ----------------------------------------------------------------------

sys.path.insert(0, str(HERE))
from proxy_bench import free_port, nginx_binary, stop, wait_for_port  # noqa: E402


def spawn(command: list[str], log: Path) -> Popen:
    with log.open("wb") as out:
        return subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def start_backend(port: int, logs: Path) -> Popen:
    command = [
        sys.executable, "-m", "uvicorn", "slow_body_bench:backend", "--app-dir", str(HERE),
        "--host", "127.0.0.1", "--port", str(port), "--http", "httptools",
        "--loop", "asyncio", "--no-access-log", "--log-level", "warning",
    ]  # fmt: skip
    return spawn(command, logs / "backend.log")


def start_serve(
    port: int, backend_port: int, request_buffer: int, max_connections: int | None, logs: Path
) -> Popen:
    config = logs / f"balancekit-{request_buffer}.toml"
    limit = "" if max_connections is None else f"max_connections = {max_connections}\n"
    config.write_text(
        f"""\
[pools.api]
backends = ["http://127.0.0.1:{backend_port}"]
request_buffer = {request_buffer}
{limit}
[[routes]]
prefix = "/api/"
pool = "api"
"""
    )
    balancekit = str(Path(sys.executable).parent / "balancekit")
    command = [balancekit, "serve", str(config), "--host", "127.0.0.1", "--port", str(port)]
    return spawn(command, logs / f"balancekit-{request_buffer}.log")


def start_nginx(binary: str, port: int, backend_port: int, logs: Path) -> Popen:
    prefix = logs / "nginx"
    prefix.mkdir()
    temp = " ".join(
        f"{kind}_temp_path {prefix}/{kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    conf = prefix / "nginx.conf"
    conf.write_text(
        f"""\
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  {temp}
  upstream backends {{ server 127.0.0.1:{backend_port}; keepalive 32; }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://backends;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      # proxy_request_buffering on: NGINX's default, left as it is
    }}
  }}
}}
"""
    )
    command = [binary, "-p", str(prefix), "-e", str(prefix / "error.log"), "-c", str(conf),
               "-g", "daemon off;"]  # fmt: skip
    return spawn(command, logs / "nginx.log")


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


# --- measuring ----------------------------------------------------------------------


def established_to(ports: list[int]) -> dict[int, int]:
    """ESTABLISHED IPv4 TCP sockets whose remote end is each port (client sides)."""
    counts = dict.fromkeys(ports, 0)
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            if fields[3] != ESTABLISHED:
                continue
            remote_port = int(fields[2].rsplit(":", 1)[1], 16)
            if remote_port in counts:
                counts[remote_port] += 1
    return counts


@dataclass
class Run:
    target: str
    backend_conns: list[int] = field(default_factory=list)
    client_conns: list[int] = field(default_factory=list)
    backend_after: int = 0
    probes_ms: list[float] = field(default_factory=list)  # answered 200
    probes_failed: list[str] = field(default_factory=list)
    attack_summary: str = ""

    def row(self) -> dict[str, object]:
        probes = len(self.probes_ms) + len(self.probes_failed)
        return {
            "target": self.target,
            "backend peak": max(self.backend_conns, default=0),
            "backend mean": round(statistics.fmean(self.backend_conns or [0]), 1),
            "backend after": self.backend_after,
            "client peak": max(self.client_conns, default=0),
            "probes ok": f"{len(self.probes_ms)}/{probes}",
            "probe median ms": round(statistics.median(self.probes_ms), 1)
            if self.probes_ms
            else None,
            "probe max ms": round(max(self.probes_ms), 1) if self.probes_ms else None,
        }


def probe_loop(url: str, run: Run, stop_event: threading.Event) -> None:
    with httpx.Client(timeout=3.0) as client:
        while not stop_event.is_set():
            started = time.perf_counter()
            try:
                response = client.post(url, content=BODY)
                elapsed = (time.perf_counter() - started) * 1000
                if response.status_code == 200 and response.content == BODY:
                    run.probes_ms.append(elapsed)
                else:
                    run.probes_failed.append(f"status {response.status_code}")
            except httpx.HTTPError as error:
                run.probes_failed.append(type(error).__name__)
            stop_event.wait(max(0.0, 1.0 - (time.perf_counter() - started)))


def check(url: str) -> None:
    response = httpx.post(url, content=BODY, timeout=5)
    if response.status_code != 200 or response.content != BODY:
        raise RuntimeError(f"{url} answered {response.status_code} {response.content[:200]!r}")


def attack(name: str, port: int, backend_port: int, args: argparse.Namespace, logs: Path) -> Run:
    url = f"http://127.0.0.1:{port}/api/"
    check(url)
    run = Run(name)
    command = [
        "slowhttptest", "-B", "-c", str(args.connections), "-r", str(args.connections),
        "-i", "5", "-x", "24", "-s", str(ATTACK_BODY), "-l", str(args.seconds),
        "-p", "3", "-t", "POST", "-u", url,
    ]  # fmt: skip
    out = logs / f"slowhttptest-{name.replace(' ', '_')}.log"
    with out.open("wb") as log:
        slow = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        time.sleep(2)  # let slowhttptest open its connections
        stop_event = threading.Event()
        prober = threading.Thread(target=probe_loop, args=(url, run, stop_event))
        prober.start()
        try:
            while slow.poll() is None:
                counts = established_to([backend_port, port])
                run.backend_conns.append(counts[backend_port])
                run.client_conns.append(counts[port])
                time.sleep(1)
        finally:
            stop_event.set()
            prober.join()
    finally:
        if slow.poll() is None:
            slow.terminate()
        slow.wait(timeout=30)
    time.sleep(3)
    run.backend_after = established_to([backend_port])[backend_port]
    lines = [line for line in out.read_text(errors="replace").splitlines() if line.strip()]
    summary = next((line for line in reversed(lines) if "service available" in line), "")
    run.attack_summary = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", summary).split())
    return run


def print_table(rows: list[dict[str, object]]) -> None:
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("| --- |" + " ---: |" * (len(keys) - 1))
    for row in rows:
        print("| " + " | ".join("-" if row[k] is None else str(row[k]) for k in keys) + " |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=int, default=20, help="attack length (20)")
    parser.add_argument("--connections", type=int, default=200, help="slow clients (200)")
    parser.add_argument(
        "--max-connections",
        type=int,
        help="the pool's max_connections (balancekit's default, 1024, when not given)",
    )
    parser.add_argument("--no-nginx", action="store_true", help="skip NGINX")
    args = parser.parse_args()
    if shutil.which("slowhttptest") is None:
        sys.exit("needs slowhttptest (apt-get install slowhttptest)")
    signal.signal(signal.SIGTERM, _raise_interrupt)

    runs: list[Run] = []
    processes: list[Popen] = []
    with tempfile.TemporaryDirectory(prefix="slow_body_bench-") as tmp:
        logs = Path(tmp)
        try:
            backend_port = free_port()
            processes.append(start_backend(backend_port, logs))
            wait_for_port(backend_port, processes[-1])
            targets: list[tuple[str, Callable[[int], Popen]]] = [
                (
                    f"balancekit serve, request_buffer = {size}",
                    lambda port, size=size: start_serve(
                        port, backend_port, size, args.max_connections, logs
                    ),
                )
                for size in (65536, 0)
            ]
            nginx = None if args.no_nginx else nginx_binary()
            if nginx is not None:
                targets.append(
                    ("nginx (proxy_request_buffering on)",
                     lambda port: start_nginx(nginx, port, backend_port, logs))
                )  # fmt: skip
            for name, start in targets:
                port = free_port()
                process = start(port)
                processes.append(process)
                wait_for_port(port, process)
                print(f"{name}: slowhttptest for {args.seconds} s ...", flush=True)
                runs.append(attack(name, port, backend_port, args, logs))
                if process.poll() is not None:
                    print(f"  {name} exited with {process.returncode}")
                if runs[-1].probes_failed:
                    print(f"  failed probes: {sorted(set(runs[-1].probes_failed))}")
                stop([process])
                processes.remove(process)
        finally:
            stop(processes)

    rows = [run.row() for run in runs]
    print()
    print_table(rows)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "args": vars(args),
                "rows": rows,
                "runs": [run.__dict__ for run in runs],
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
