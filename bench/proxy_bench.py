"""How fast is balancekit as a proxy, next to what Python and NGINX can do?

Method. Three fast backends and wrk (-t1 -c32, keep-alive) share core 0;
every proxy under test runs alone on core 1, so each is limited by its own CPU
and all get the same one. Backends (``--backends``): Python (a raw ASGI app
answering 100 bytes, uvicorn + httptools, one worker each) or NGINX (one
worker serving the same 100 bytes from three ports), or both in turn.
Targets:

- the backend directly (the ceiling of this setup, no proxy),
- balancekit's ``BalanceMiddleware`` under uvicorn (httptools, lifespan on,
  access log off) with ``transport = "aiohttp"``, and with
  ``transport = "httptools"`` (balancekit's own client, the default),
  and (``--with-httpx``) with ``transport = "httpx"``,
- ``balancekit serve`` (its lean server, uvloop when installed, default
  transport) for the same configuration,
- a minimal hand-written aiohttp proxy under uvicorn (``_apps.reference``):
  the reference for what Python does with the same client,
- the lean Python proxy (``bench/lean_proxy.py``): asyncio Protocols,
  httptools and uvloop with no feature at all, the ceiling for Python
  ("x lean" is each target's requests/s over its),
- NGINX (master + 1 worker, upstream keepalive 32), when installed.

Every balancekit target runs the full request path: round robin, an HTTP
health check every 2 s, status counters (and the status page), X-Forwarded-*.

Before measuring, each target must answer 200 with the backend's body, and a
proxy must reach all three backends, so an error page is never benchmarked.
Targets run in interleaved rounds (round 1: every target, round 2: every
target, ...) so drift on the machine hits them alike; each run is preceded by
a 1 s unmeasured wrk warm-up. Per target, over the rounds:

- requests/s: the median round,
- CPU us per request: utime + stime of the target's process tree (from
  /proc/PID/stat, so NGINX's master and worker both count) over the measured
  wrk run, divided by the requests wrk completed; median round,
- idle RSS: VmRSS before the first measured run; peak RSS: VmHWM at the end,
  each summed over the process tree,
- p99 latency (median round) and failed requests (non-2xx and socket
  errors, summed over rounds; anything but 0 makes the numbers suspect).

Every server is a subprocess of this script, pinned with taskset, stopped by
PID on exit (also on Ctrl-C, SIGTERM or an error).

Before and after (``--baseline DIR``). DIR is another checkout of this
repository, say ``git worktree add /tmp/base HEAD`` next to a working tree
being refactored. Every balancekit target (the middleware with each
transport, ``balancekit serve``) then runs a second time with the package
imported from DIR, as "NAME (baseline)", right after its twin in every round;
the report adds for each balancekit target ``x base``, its requests/s over its
twin's, and ``CPU x base``, its CPU us per request over its twin's (below 1:
cheaper than before). How a process gets its checkout's package: both
variants alike are given that checkout first on PYTHONPATH and
PYTHONSAFEPATH=1, and ``balancekit serve`` is ``python -m balancekit serve``
(the console script in .venv/bin would not do: it is the installed one's).
PYTHONPATH alone is not enough: ``python -m`` puts the current directory
ahead of it, so run from the working tree every variant would import the
working tree (the editable install's .pth entry, on the other hand, comes
after PYTHONPATH). Before starting a server, the bench imports balancekit
that way from each checkout and stops unless the package comes from there;
the JSON records each one's path, commit and whether balancekit/ has
uncommitted changes. The rest is the working tree's for both: this script,
bench/_apps.py (config and harness), the venv's dependencies and plugins.

    .venv/bin/python bench/proxy_bench.py            # 5 rounds of 5 s per backend kind
    .venv/bin/python bench/proxy_bench.py --quick    # 1 round of 2 s
    .venv/bin/python bench/proxy_bench.py --profile  # then py-spy on balancekit serve
    .venv/bin/python bench/proxy_bench.py --baseline /tmp/base  # and each against DIR's
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
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
from types import FrameType

import httpx

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results" / "proxy_bench.json"
CLIENT_CORE, PROXY_CORE = "0", "1"
TICK = os.sysconf("SC_CLK_TCK")
BODY = b"x" * 100
N_BACKENDS = 3

BACKEND = "backend directly"
BALANCEKIT = "middleware (aiohttp)"
BALANCEKIT_HTTPX = "middleware (httpx)"
BALANCEKIT_FAST = "middleware (httptools)"
SERVE = "balancekit serve"
REFERENCE = "reference aiohttp proxy"
LEAN = "lean Python proxy"
NGINX = "nginx"
#: The targets that run balancekit: with --baseline, each has a twin named
#: NAME + BASELINE, run with the package from DIR.
BALANCEKIT_TARGETS = (BALANCEKIT, BALANCEKIT_HTTPX, BALANCEKIT_FAST, SERVE)
BASELINE = " (baseline)"

#: Issue 22's targets (fast path II).
SERVE_MIN_X_NGINX = 0.6
SERVE_MAX_CPU_X_NGINX = 2.0
SERVE_MAX_IDLE_RSS_MB = 40.0
FAST_MIN_X_REFERENCE = 2.5

Popen = subprocess.Popen[bytes]


# --- processes ----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, process: Popen, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited with {process.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {timeout} s")


def spawn(command: list[str], core: str, env: dict[str, str] | None = None) -> Popen:
    # A session of its own: Ctrl-C reaches only this script, which then
    # stops every server in order.
    return subprocess.Popen(
        ["taskset", "-c", core, *command],
        env={**os.environ, **(env or {})},
        start_new_session=True,
    )


def package_env(root: Path) -> dict[str, str]:
    """The environment in which a Python subprocess imports balancekit from the
    checkout ``root``: first on PYTHONPATH, and PYTHONSAFEPATH so that ``-m``
    does not put the current directory (often the working tree) before it."""
    path = [str(root), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {"PYTHONPATH": os.pathsep.join(path), "PYTHONSAFEPATH": "1"}


def checkout(root: Path) -> dict[str, object]:
    """Where ``import balancekit`` comes from in ``package_env(root)``, refusing
    a checkout that would not be the one measured; its commit, and whether
    balancekit/ differs from it (read-only git: no index refresh)."""
    done = subprocess.run(
        [sys.executable, "-c", "import balancekit; print(balancekit.__file__)"],
        env={**os.environ, **package_env(root)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    package = Path(done.stdout.strip()).resolve().parent if done.returncode == 0 else None
    if package != (root / "balancekit").resolve():
        raise RuntimeError(f"balancekit from {root} is imported from: {done.stdout or done.stderr}")
    git = ["git", "-C", str(root)]
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}
    head = subprocess.run(
        [*git, "rev-parse", "--short", "HEAD"], env=env, capture_output=True, text=True
    )
    status = subprocess.run(
        [*git, "status", "--porcelain", "--", "balancekit"],
        env=env,
        capture_output=True,
        text=True,
    )
    return {
        "package": str(package),
        "commit": head.stdout.strip() or None,
        "modified": bool(status.stdout.strip()) if status.returncode == 0 else None,
    }


def start_uvicorn(app: str, port: int, core: str, env: dict[str, str]) -> Popen:
    command = [
        sys.executable, "-m", "uvicorn", app, "--app-dir", str(HERE),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--http", "httptools", "--loop", "asyncio", "--lifespan", "on",
        "--no-access-log", "--log-level", "warning", "--no-proxy-headers",
    ]  # fmt: skip
    return spawn(command, core, env)


def nginx_binary() -> str | None:
    found = shutil.which("nginx")
    if found is None and Path("/usr/sbin/nginx").exists():
        found = "/usr/sbin/nginx"
    return found


def nginx_config(port: int, backend_ports: list[int], prefix: Path) -> str:
    servers = " ".join(f"server 127.0.0.1:{p};" for p in backend_ports)
    temp = " ".join(
        f"{kind}_temp_path {prefix}/{kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""\
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  {temp}
  upstream backends {{ {servers} keepalive 32; }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://backends;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header X-Forwarded-For $remote_addr;
      proxy_set_header X-Forwarded-Proto $scheme;
    }}
  }}
}}
"""


def nginx_backends_config(ports: list[int], prefix: Path) -> str:
    servers = "\n".join(
        f"  server {{ listen 127.0.0.1:{port}; location / {{ default_type text/plain; "
        f'add_header x-backend backend-{i + 1}; return 200 "{BODY.decode()}"; }} }}'
        for i, port in enumerate(ports)
    )
    return f"""\
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  keepalive_requests 1000000;
{servers}
}}
"""


def start_nginx(
    binary: str, port: int, backend_ports: list[int], prefix: Path, *, static: bool = False
) -> Popen:
    prefix.mkdir(parents=True, exist_ok=True)
    conf = prefix / "nginx.conf"
    if static:
        conf.write_text(nginx_backends_config(backend_ports, prefix))
    else:
        conf.write_text(nginx_config(port, backend_ports, prefix))
    command = [binary, "-p", str(prefix), "-e", str(prefix / "error.log"), "-c", str(conf),
               "-g", "daemon off;"]  # fmt: skip
    return spawn(command, CLIENT_CORE if static else PROXY_CORE)


def stop(processes: list[Popen]) -> None:
    """SIGTERM every process (and what it forked) by PID; SIGKILL what lingers."""
    trees = {p.pid: process_tree(p.pid) for p in processes if p.poll() is None}
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    for pids in trees.values():  # a worker orphaned by a killed master
        for pid in pids[1:]:
            if Path(f"/proc/{pid}").exists():
                os.kill(pid, signal.SIGKILL)


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


# --- /proc --------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str]:
    # Fields after "(comm)": state is [0], ppid [1], utime [11], stime [12].
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (NGINX: master and worker)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int(_stat_fields(int(entry.name))[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo += children.get(current, [])
    return tree


def cpu_seconds(pid: int) -> float:
    total = 0
    for p in process_tree(pid):
        try:
            fields = _stat_fields(p)
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / TICK


def peak_rss_mb(pid: int, field: str = "VmHWM") -> float:
    total_kb = 0
    for p in process_tree(pid):
        try:
            status = Path(f"/proc/{p}/status").read_text()
        except OSError:
            continue
        found = re.search(rf"^{field}:\s+(\d+) kB", status, re.MULTILINE)
        total_kb += int(found.group(1)) if found else 0
    return total_kb / 1024


# --- wrk ----------------------------------------------------------------------------


@dataclass
class WrkRun:
    rps: float
    requests: int
    failed: int
    p99_ms: float


_UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def _number(pattern: str, text: str) -> str:
    found = re.search(pattern, text)
    if found is None:
        raise RuntimeError(f"wrk output lacks {pattern!r}:\n{text}")
    return found.group(1)


def parse_wrk(out: str) -> WrkRun:
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    p99 = re.search(r"^\s+99%\s+([\d.]+)(us|ms|s)\s*$", out, re.MULTILINE)
    return WrkRun(
        rps=float(_number(r"Requests/sec:\s+([\d.]+)", out)),
        requests=int(_number(r"(\d+) requests in", out)),
        failed=(int(non_2xx.group(1)) if non_2xx else 0)
        + (sum(map(int, errors.groups())) if errors else 0),
        p99_ms=float(p99.group(1)) * _UNITS_MS[p99.group(2)] if p99 else float("nan"),
    )


def wrk(url: str, seconds: int, connections: int) -> WrkRun:
    command = ["taskset", "-c", CLIENT_CORE, "wrk", "-t1", f"-c{connections}",
               f"-d{seconds}s", "--latency", url]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 30)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr or done.stdout}")
    return parse_wrk(done.stdout)


# --- targets ------------------------------------------------------------------------


@dataclass
class Target:
    name: str
    port: int
    process: Popen
    runs: list[WrkRun] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)
    idle_rss_mb: float = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/bench?q=1"


def check_answers(target: Target, is_proxy: bool) -> None:
    """Refuse to benchmark error pages: 200, the backend's body, every backend used."""
    seen: set[str] = set()
    with httpx.Client(timeout=5) as client:
        for _ in range(3 * N_BACKENDS):
            response = client.get(target.url)
            if response.status_code != 200 or response.content != BODY:
                raise RuntimeError(
                    f"{target.name} answered {response.status_code}: {response.text[:300]!r}"
                )
            seen.add(response.headers.get("x-backend", "?"))
    if is_proxy and len(seen) != N_BACKENDS:
        raise RuntimeError(f"{target.name} reached backends {sorted(seen)}, not all three")


def measure(target: Target, seconds: int, connections: int) -> None:
    wrk(target.url, 1, connections)  # warm up: connections, pools, caches
    before = cpu_seconds(target.process.pid)
    run = wrk(target.url, seconds, connections)
    used = cpu_seconds(target.process.pid) - before
    target.runs.append(run)
    target.cpu_us.append(used / max(run.requests, 1) * 1e6)


# --- report -------------------------------------------------------------------------

Row = dict[str, object]


def summarize(targets: list[Target]) -> dict[str, Row]:
    medians = {t.name: statistics.median(r.rps for r in t.runs) for t in targets}
    cpu = {t.name: statistics.median(t.cpu_us) for t in targets}
    twinned = any(t.name.endswith(BASELINE) for t in targets)
    rows: dict[str, Row] = {}
    for t in targets:
        rps = medians[t.name]
        # With --baseline, every row has the ratios to its twin (None: no twin).
        twin = t.name + BASELINE
        against_baseline = {
            "x_baseline": _ratio(rps, medians.get(twin)),
            "cpu_x_baseline": _ratio(cpu[t.name], cpu.get(twin)),
        }
        rows[t.name] = {
            "requests_per_s": round(rps),
            "x_reference": round(rps / medians[REFERENCE], 3) if REFERENCE in medians else None,
            "x_nginx": round(rps / medians[NGINX], 3) if NGINX in medians else None,
            "x_lean": round(rps / medians[LEAN], 3) if LEAN in medians else None,
            **(against_baseline if twinned else {}),
            "cpu_us_per_request": round(cpu[t.name], 1),
            "idle_rss_mb": round(t.idle_rss_mb, 1),
            "peak_rss_mb": round(peak_rss_mb(t.process.pid), 1),
            "p99_ms": round(statistics.median(r.p99_ms for r in t.runs), 2),
            "failed": sum(r.failed for r in t.runs),
            "rounds_requests_per_s": [round(r.rps) for r in t.runs],
            "rounds_cpu_us_per_request": [round(c, 1) for c in t.cpu_us],
        }
    return rows


def _ratio(value: float, base: float | None) -> float | None:
    return round(value / base, 3) if base else None


def _goal(value: object, target: str, met: bool) -> dict[str, object]:
    return {"value": value, "target": target, "met": met}


def goals(rows: dict[str, Row]) -> dict[str, dict[str, dict[str, object]]]:
    """Issue 22's targets: value, target, met."""
    checks: dict[str, dict[str, dict[str, object]]] = {}
    serve, nginx = rows.get(SERVE), rows.get(NGINX)
    if serve is not None and nginx is not None:
        x_nginx = serve["x_nginx"]
        cpu_x = round(float(serve["cpu_us_per_request"]) / float(nginx["cpu_us_per_request"]), 2)  # type: ignore[arg-type]
        checks[SERVE] = {
            "x_nginx": _goal(
                x_nginx,
                f">= {SERVE_MIN_X_NGINX}",
                float(x_nginx) >= SERVE_MIN_X_NGINX,  # type: ignore[arg-type]
            ),
            "cpu_x_nginx": _goal(
                cpu_x, f"<= {SERVE_MAX_CPU_X_NGINX}", cpu_x <= SERVE_MAX_CPU_X_NGINX
            ),
            "idle_rss_mb": _goal(
                serve["idle_rss_mb"],
                f"<= {SERVE_MAX_IDLE_RSS_MB}",
                float(serve["idle_rss_mb"]) <= SERVE_MAX_IDLE_RSS_MB,  # type: ignore[arg-type]
            ),
        }
    fast = rows.get(BALANCEKIT_FAST)
    if fast is not None and fast["x_reference"] is not None:
        x_ref = fast["x_reference"]
        checks[BALANCEKIT_FAST] = {
            "x_reference": _goal(
                x_ref,
                f">= {FAST_MIN_X_REFERENCE}",
                float(x_ref) >= FAST_MIN_X_REFERENCE,  # type: ignore[arg-type]
            )
        }
    return checks


COLUMNS = [
    ("req/s", "requests_per_s"),
    ("x ref", "x_reference"),
    ("x nginx", "x_nginx"),
    ("x lean", "x_lean"),
    ("x base", "x_baseline"),  # these two only with --baseline
    ("CPU us/req", "cpu_us_per_request"),
    ("CPU x base", "cpu_x_baseline"),
    ("idle RSS MB", "idle_rss_mb"),
    ("peak RSS MB", "peak_rss_mb"),
    ("p99 ms", "p99_ms"),
    ("failed", "failed"),
]


def print_table(rows: dict[str, Row]) -> None:
    columns = [(title, key) for title, key in COLUMNS if any(key in row for row in rows.values())]
    header = ["target", *(title for title, _ in columns)]
    table = [
        [name, *("-" if row[key] is None else str(row[key]) for _, key in columns)]
        for name, row in rows.items()
    ]
    widths = [max(len(line[i]) for line in [header, *table]) for i in range(len(header))]
    for line in [header, ["-" * w for w in widths], *table]:
        cells = [line[0].ljust(widths[0])]
        cells += [cell.rjust(width) for cell, width in zip(line[1:], widths[1:], strict=True)]
        print("  ".join(cells))
    if any("x_baseline" in row for row in rows.values()):
        print(
            f"\nx base: requests/s over the{BASELINE} twin's; "
            "CPU x base: CPU us/req over the twin's (below 1: cheaper than the baseline)"
        )


def print_goals(checks: dict[str, dict[str, dict[str, object]]]) -> None:
    for name, by_metric in checks.items():
        print(f"\n{name} against the project's targets:")
        for metric, check in by_metric.items():
            verdict = "met   " if check["met"] else "MISSED"
            print(f"  {verdict} {metric:<20} {check['value']} (target {check['target']})")


# --- profile ------------------------------------------------------------------------


def profile(target: Target, seconds: int, connections: int, output: Path) -> None:
    """Sample ``target`` with py-spy during an extra, unmeasured wrk run; print
    balancekit's functions by share of the samples (inclusive and self)."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(py_spy).exists():
        sys.exit("--profile needs py-spy: pip install py-spy")
    command = [py_spy, "record", "--format", "raw", "--rate", "250", "--nonblocking",
               "--duration", str(seconds), "--pid", str(target.process.pid),
               "-o", str(output)]  # fmt: skip
    spy = subprocess.Popen(
        ["taskset", "-c", CLIENT_CORE, *command],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(0.5)
        wrk(target.url, seconds, connections)
        spy.wait(timeout=30)
    finally:
        stop([spy])
    print(f"\npy-spy of {target.name} (raw samples in {output}):")
    print_profile(output.read_text())


_OURS = re.compile(r" \((balancekit/[^:]+):\d+\)$")


def print_profile(raw: str, top: int = 15) -> None:
    inclusive: dict[str, int] = {}
    own: dict[str, int] = {}
    total = torn = 0
    for line in raw.splitlines():
        stack, _, text = line.rpartition(" ")
        if not text.isdigit():
            # --nonblocking reads the process's memory while it runs: now
            # and then a frame's name is caught half-written.
            torn += 1
            continue
        samples = int(text)
        total += samples
        # "_Exchange.run (balancekit/_engine_async.py:273)" -> "_Exchange.run balancekit/..."
        frames = [_OURS.sub(r" \1", frame) for frame in stack.split(";")]
        ours = {frame for frame in frames if " balancekit/" in frame}
        for frame in ours:
            inclusive[frame] = inclusive.get(frame, 0) + samples
        if frames[-1] in ours:
            own[frames[-1]] = own.get(frames[-1], 0) + samples
    print(f"  {total} samples; balancekit's own code (self): {sum(own.values()) / total:.1%}")
    if torn:
        print(f"  ({torn} torn stacks left out)")
    print("  inclusive  self  function")
    for frame, count in sorted(inclusive.items(), key=lambda kv: -kv[1])[:top]:
        name, path = frame.rsplit(" ", 1)
        print(f"  {count / total:9.1%}  {own.get(frame, 0) / total:4.1%}  {path}:{name}")


# --- main ---------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--duration", type=int, default=5, help="seconds per run (default 5)")
    parser.add_argument("--connections", type=int, default=32, help="wrk -c (default 32)")
    parser.add_argument(
        "--backends",
        choices=["python", "nginx", "both"],
        default="both",
        help="what the proxies forward to (default: both, in turn)",
    )
    parser.add_argument("--with-httpx", action="store_true", help="also the httpx transport")
    parser.add_argument("--quick", action="store_true", help="1 round of 2 s")
    parser.add_argument(
        "--profile", action="store_true", help="then sample balancekit serve with py-spy"
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        metavar="DIR",
        help="also run each balancekit target with the package from DIR, another checkout"
        " (a git worktree of an older commit, say), and compare",
    )
    parser.add_argument("--output", type=Path, default=RESULTS, help=f"default {RESULTS}")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.duration = 1, 2
    if args.baseline is not None:
        args.baseline = args.baseline.resolve()
        if not (args.baseline / "balancekit" / "__init__.py").is_file():
            parser.error(f"--baseline {args.baseline}: no balancekit package in it")
        if args.baseline == ROOT:
            parser.error(f"--baseline {args.baseline} is this working tree")
    return args


def write_serve_config(path: Path, backend_urls: list[str]) -> None:
    """The TOML twin of ``_apps.balancekit_config`` (default transport)."""
    sys.path.insert(0, str(HERE))
    from _apps import balancekit_config

    config = balancekit_config("httptools", backend_urls)
    pool = config["pools"]["p"]
    check = pool["health_check"]
    path.write_text(
        f'transport = "{config["transport"]}"\n'
        "[pools.p]\n"
        f"backends = {json.dumps(backend_urls)}\n"
        f'algorithm = "{pool["algorithm"]}"\n'
        f'health_check = {{ type = "{check["type"]}", path = "{check["path"]}", '
        f"interval = {check['interval']} }}\n"
        '[[routes]]\nprefix = "/"\npool = "p"\n'
        f'[status]\nenabled = true\npath = "{config["status"]["path"]}"\n'
    )


def twins(name: str, baseline: Path | None) -> list[tuple[str, Path]]:
    """(name suffix, checkout to import balancekit from) for each run of target
    ``name``: the working tree's, then for a balancekit target DIR's."""
    if baseline is None or name not in BALANCEKIT_TARGETS:
        return [("", ROOT)]
    return [("", ROOT), (BASELINE, baseline)]


def start_targets(
    processes: list[Popen], prefix: Path, kind: str, with_httpx: bool, baseline: Path | None
) -> list[Target]:
    """Start backends and proxies, appending each process to ``processes`` at once;
    a baseline twin right after its target, so it runs next to it in every round."""
    backend_ports = [free_port() for _ in range(N_BACKENDS)]
    binary = nginx_binary()
    if kind == "nginx":
        if binary is None:
            raise RuntimeError("--backends nginx needs nginx: apt-get install nginx")
        processes.append(start_nginx(binary, 0, backend_ports, prefix / "backends", static=True))
        backend_process = processes[-1]
    else:
        for i, port in enumerate(backend_ports):
            env = {"BENCH_NAME": f"backend-{i + 1}"}
            processes.append(start_uvicorn("_apps:backend", port, CLIENT_CORE, env))
        backend_process = processes[-N_BACKENDS]
    targets = [Target(BACKEND, backend_ports[0], backend_process)]
    urls = [f"http://127.0.0.1:{p}" for p in backend_ports]
    env = {"BENCH_BACKENDS": ",".join(urls)}
    plan = [
        (BALANCEKIT, "_apps:balancekit_app", {"BENCH_TRANSPORT": "aiohttp"}),
        (BALANCEKIT_FAST, "_apps:balancekit_app", {"BENCH_TRANSPORT": "httptools"}),
        (REFERENCE, "_apps:reference", {}),
    ]
    if with_httpx:
        plan.insert(1, (BALANCEKIT_HTTPX, "_apps:balancekit_app", {"BENCH_TRANSPORT": "httpx"}))
    for name, app, extra in plan:
        for suffix, root in twins(name, baseline):
            port = free_port()
            app_env = {**env, **extra, **package_env(root)}
            processes.append(start_uvicorn(app, port, PROXY_CORE, app_env))
            targets.append(Target(name + suffix, port, processes[-1]))
    config = prefix / f"serve-{kind}.toml"
    write_serve_config(config, urls)
    for suffix, root in twins(SERVE, baseline):
        port = free_port()
        serve = [sys.executable, "-m", "balancekit", "serve", str(config), "--port", str(port)]
        processes.append(spawn(serve, PROXY_CORE, package_env(root)))
        targets.append(Target(SERVE + suffix, port, processes[-1]))
    # The pure-Python ceiling (bench/lean_proxy.py), on the proxies' core.
    port = free_port()
    lean = [sys.executable, str(HERE / "lean_proxy.py"), "--port", str(port)]
    processes.append(spawn([*lean, "--backends", ",".join(urls)], PROXY_CORE))
    targets.append(Target(LEAN, port, processes[-1]))
    if binary is None:
        print("nginx not installed: skipped", file=sys.stderr)
    else:
        port = free_port()
        processes.append(start_nginx(binary, port, backend_ports, prefix / f"proxy-{kind}"))
        targets.append(Target(NGINX, port, processes[-1]))
    for port in backend_ports:
        wait_for_port(port, backend_process)
    for target in targets:
        wait_for_port(target.port, target.process)
        check_answers(target, is_proxy=target.name != BACKEND)
        target.idle_rss_mb = peak_rss_mb(target.process.pid, "VmRSS")
    return targets


def run_kind(
    args: argparse.Namespace, prefix: Path, processes: list[Popen], kind: str
) -> dict[str, object]:
    targets = start_targets(processes, prefix, kind, args.with_httpx, args.baseline)
    print(f"{kind} backends: all {len(targets)} targets answer 200", file=sys.stderr)
    for round_ in range(args.rounds):
        for target in targets:
            measure(target, args.duration, args.connections)
        print(f"round {round_ + 1}/{args.rounds} done", file=sys.stderr)
    rows = summarize(targets)
    checks = goals(rows)
    print(f"\n## {kind} backends\n")
    print_table(rows)
    print_goals(checks)
    if args.profile:
        by_name = {t.name: t for t in targets}
        output = args.output.with_name(f"serve-{kind}.pyspy.txt")
        output.parent.mkdir(parents=True, exist_ok=True)
        profile(by_name[SERVE], max(args.duration, 5), args.connections, output)
    stop(processes)
    processes.clear()
    return {"targets": rows, "goals": checks}


def run(args: argparse.Namespace, prefix: Path, processes: list[Popen]) -> dict[str, object]:
    kinds = ["python", "nginx"] if args.backends == "both" else [args.backends]
    # Checked before any server starts: each variant imports its own checkout.
    packages = {"working_tree": checkout(ROOT)}
    if args.baseline is not None:
        packages["baseline"] = checkout(args.baseline)
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "rounds": args.rounds,
        "duration_s": args.duration,
        "connections": args.connections,
        "balancekit": packages,
        "backends": {kind: run_kind(args, prefix, processes, kind) for kind in kinds},
    }


def main() -> None:
    args = parse_args()
    if shutil.which("wrk") is None or shutil.which("taskset") is None:
        sys.exit("wrk and taskset are needed: apt-get install wrk util-linux")
    signal.signal(signal.SIGTERM, _raise_interrupt)
    processes: list[Popen] = []
    prefix = Path(tempfile.mkdtemp(prefix="balancekit-bench-", dir="/tmp"))
    started = time.monotonic()
    try:
        summary = run(args, prefix, processes)
    finally:
        stop(processes)
        shutil.rmtree(prefix, ignore_errors=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nwritten to {args.output} ({time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
