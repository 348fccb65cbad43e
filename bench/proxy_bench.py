"""How fast is balancekit as a proxy, next to what Python and NGINX can do?

Method: three fast Python backends (uvicorn + httptools, 100-byte answers)
and wrk share core 0; every proxy under test runs alone on core 1, so each
is limited by its own CPU. Targets are measured in interleaved rounds
(round 1: every target, round 2: every target, ...) so that drift on the
machine hits all of them alike; the median round counts. For each proxy:

- requests/s (wrk -t1 -cN, keep-alive),
- CPU time per request: utime + stime of the proxy's processes over the
  measured run (from /proc), divided by the requests wrk completed,
- peak RSS (VmHWM) at the end.

Targets: the backend directly; balancekit's ASGI middleware under uvicorn
(aiohttp transport, and httpx); a minimal hand-written aiohttp proxy under
uvicorn (the reference for Python); NGINX with one worker, if installed.

    .venv/bin/python bench/proxy_bench.py            # 3 rounds of 5 s
    .venv/bin/python bench/proxy_bench.py --quick    # 1 round of 2 s
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "proxy_bench.json"
CLIENT_CORE, PROXY_CORE = "0", "1"
TICK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


def uvicorn(app: str, port: int, core: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    command = [
        "taskset", "-c", core, sys.executable, "-m", "uvicorn", app,
        "--app-dir", str(HERE), "--port", str(port), "--host", "127.0.0.1",
        "--http", "httptools", "--no-access-log", "--log-level", "warning",
        "--no-proxy-headers", "--lifespan", "on",
    ]  # fmt: skip
    return subprocess.Popen(command, env={**os.environ, **env})


def nginx(port: int, backends: list[int], prefix: Path) -> subprocess.Popen[bytes] | None:
    binary = shutil.which("nginx") or (
        "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
    )
    if binary is None:
        return None
    (prefix / "logs").mkdir(parents=True, exist_ok=True)
    servers = "".join(f"server 127.0.0.1:{p};" for p in backends)
    (prefix / "nginx.conf").write_text(
        f"""worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/logs/error.log warn;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  client_body_temp_path {prefix}/body; proxy_temp_path {prefix}/proxy;
  fastcgi_temp_path {prefix}/fcgi; uwsgi_temp_path {prefix}/uwsgi; scgi_temp_path {prefix}/scgi;
  upstream backends {{ {servers} keepalive 32; }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://backends;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header X-Forwarded-For $remote_addr;
    }}
  }}
}}
"""
    )
    command = ["taskset", "-c", PROXY_CORE, binary, "-p", str(prefix), "-c",
               str(prefix / "nginx.conf"), "-g", "daemon off;"]  # fmt: skip
    return subprocess.Popen(command)


def process_tree(pid: int) -> list[int]:
    pids = [pid]
    for task in Path(f"/proc/{pid}/task").iterdir():
        children = (task / "children").read_text().split()
        for child in children:
            pids += process_tree(int(child))
    return pids


def cpu_seconds(pid: int) -> float:
    total = 0
    for p in process_tree(pid):
        fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / TICK


def peak_rss_mb(pid: int) -> float:
    peak = 0
    for p in process_tree(pid):
        for line in Path(f"/proc/{p}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                peak = max(peak, int(line.split()[1]))
    return peak / 1024


def wrk(url: str, seconds: float, connections: int) -> tuple[float, int, int]:
    out = subprocess.run(
        ["taskset", "-c", CLIENT_CORE, "wrk", "-t1", f"-c{connections}", f"-d{seconds}s", url],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    done = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    failed = (int(bad.group(1)) if bad else 0) + (sum(map(int, errors.groups())) if errors else 0)
    return rps, done, failed


@dataclass
class Target:
    name: str
    port: int
    process: subprocess.Popen[bytes]
    rps: list[float] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)
    failed: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/bench"


def check_answers(target: Target) -> None:
    with httpx.Client() as client:
        for _ in range(6):
            response = client.get(target.url)
            if response.status_code != 200 or response.content != b"x" * 100:
                raise RuntimeError(
                    f"{target.name} answered {response.status_code}: {response.text!r}"
                )


def measure(target: Target, seconds: float, connections: int) -> None:
    wrk(target.url, 1, connections)  # warm up: connections, pools, caches
    before = cpu_seconds(target.process.pid)
    rps, done, failed = wrk(target.url, seconds, connections)
    used = cpu_seconds(target.process.pid) - before
    target.rps.append(rps)
    target.cpu_us.append(used / max(done, 1) * 1e6)
    target.failed += failed


def report(targets: list[Target]) -> dict[str, object]:
    by_name = {t.name: t for t in targets}
    reference = by_name.get("reference aiohttp proxy")
    nginx_target = by_name.get("nginx")
    rows = {}
    for t in targets:
        rps = statistics.median(t.rps)
        row = {
            "requests_per_s": round(rps),
            "cpu_us_per_request": round(statistics.median(t.cpu_us), 1),
            "peak_rss_mb": round(peak_rss_mb(t.process.pid), 1),
            "failed": t.failed,
            "rounds": [round(r) for r in t.rps],
        }
        if reference is not None:
            row["x_reference"] = round(rps / statistics.median(reference.rps), 3)
        if nginx_target is not None:
            row["x_nginx"] = round(rps / statistics.median(nginx_target.rps), 3)
        rows[t.name] = row
    return rows


def print_table(rows: dict[str, dict[str, object]]) -> None:
    headers = ["target", "req/s", "x reference", "x nginx", "CPU us/req", "peak RSS MB", "failed"]
    keys = ["requests_per_s", "x_reference", "x_nginx", "cpu_us_per_request", "peak_rss_mb",
            "failed"]  # fmt: skip
    table = [[name] + [str(row.get(k, "-")) for k in keys] for name, row in rows.items()]
    widths = [max(len(r[i]) for r in [headers, *table]) for i in range(len(headers))]
    for line in [headers, ["-" * w for w in widths], *table]:
        print("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="1 round of 2 s")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.duration = 1, 2
    if shutil.which("wrk") is None:
        sys.exit("wrk is needed: apt-get install wrk")

    processes: list[subprocess.Popen[bytes]] = []
    prefix = Path(tempfile.mkdtemp(prefix="balancekit-bench-"))
    try:
        backend_ports = [free_port() for _ in range(3)]
        for port in backend_ports:
            processes.append(uvicorn("_apps:backend", port, CLIENT_CORE, {}))
        env = {"BENCH_BACKENDS": ",".join(f"http://127.0.0.1:{p}" for p in backend_ports)}
        targets = [Target("backend directly", backend_ports[0], processes[0])]
        plan = [
            ("balancekit (aiohttp)", "_apps:balancekit_app", {}),
            ("balancekit (httpx)", "_apps:balancekit_app", {"BENCH_TRANSPORT": "httpx"}),
            ("reference aiohttp proxy", "_apps:reference", {}),
        ]
        for name, app, extra in plan:
            port = free_port()
            process = uvicorn(app, port, PROXY_CORE, {**env, **extra})
            processes.append(process)
            targets.append(Target(name, port, process))
        port = free_port()
        process = nginx(port, backend_ports, prefix)
        if process is not None:
            processes.append(process)
            targets.append(Target("nginx", port, process))
        for target in targets:
            wait_for_port(target.port)
            check_answers(target)

        for round_ in range(args.rounds):
            for target in targets:
                measure(target, args.duration, args.connections)
            print(f"round {round_ + 1}/{args.rounds} done", file=sys.stderr)

        rows = report(targets)
        print_table(rows)
        RESULTS.parent.mkdir(exist_ok=True)
        summary = {"rounds": args.rounds, "duration_s": args.duration,
                   "connections": args.connections, "targets": rows}  # fmt: skip
        RESULTS.write_text(json.dumps(summary, indent=2) + "\n")
        print(f"\nwritten to {RESULTS}")
    finally:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
        shutil.rmtree(prefix, ignore_errors=True)


if __name__ == "__main__":
    main()
