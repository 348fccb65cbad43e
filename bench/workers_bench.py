"""What ``balancekit serve --workers 2`` buys over one worker, next to NGINX's
``worker_processes 2``, and what a worker kill or a reload costs under load.

Method. The reuse of ``proxy_bench.py``'s machinery, with a different
pinning: three NGINX static backends (one worker answering 100 bytes on three
ports) and wrk (``-t1``, keep-alive) share core 0, as there; but every proxy
gets BOTH cores (``taskset -c 0,1``), since a second worker needs a second
core. So a proxy's second worker competes with wrk and the backends for core
0: on this 2-core machine no proxy can reach 2x, and the ``backend directly``
row (wrk against one backend, no proxy) is the ceiling of the setup.

1. Throughput. ``balancekit serve CONFIG --workers 1`` and ``--workers 2``,
   both over ``store = "redis://127.0.0.1:6379/12"`` so that the only
   difference is N (one worker also coordinates through Redis), and NGINX as
   a proxy (``keepalive 32`` upstream, as proxy_bench's) with
   ``worker_processes 1`` and ``2``. Interleaved rounds (default 3 x 5 s),
   each run after a 1 s unmeasured warm-up. Per target: requests/s (median
   round), CPU us per request (utime + stime of the process tree: supervisor
   or master plus workers; median round), p99 (median round), failed
   requests (non-2xx + socket errors, all rounds), each worker's share of
   the tree's CPU and the client connections each worker held half-way
   through the run (from /proc/net/tcp and /proc/PID/fd), the Redis
   server's CPU per request (the whole server, which other users may share),
   and the share of the machine's CPUs that processes not the benchmark's
   used meanwhile (/proc/stat minus every tree of ours): on a shared
   machine, how much a run's numbers suffered.
   Ratios: workers 2 / workers 1 for balancekit and for NGINX, and
   balancekit / NGINX at equal N.
2. Disruption, each against a fresh ``serve --workers 2`` under
   ``wrk -c32 -d10s``: no event (the control), SIGKILL of one worker (a
   child of the supervisor, from /proc) at 3 s, SIGHUP of the supervisor at
   3 s after rewriting the file with a harmless change (the health check
   interval 2 -> 3 s, which rebuilds the pool; a backend's weight 1 -> 2,
   which keeps it), and SIGHUP with a broken file (an unknown algorithm).
   Reported: what wrk says (requests completed, non-2xx, socket errors
   connect/read/write/timeout), the worker pids before and after, for a kill
   whether and how soon a new child appeared and the connections each
   worker held 4 s after the event, and the supervisor's log lines. A
   killed worker's keep-alive connections are reset: wrk counts a read error
   for each and reconnects.

Redis db 12 is flushed before and after. Every process is a subprocess of
this script, started and stopped by PID (also on Ctrl-C or SIGTERM); every
wait is bounded in time.

    .venv/bin/python bench/workers_bench.py             # 3 rounds of 5 s, ~3 min
    .venv/bin/python bench/workers_bench.py --quick     # 1 round of 2 s, disruption 6 s
    .venv/bin/python bench/workers_bench.py --checkout /tmp/head  # balancekit from there
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from proxy_bench import (
    CLIENT_CORE,
    N_BACKENDS,
    ROOT,
    TICK,
    Popen,
    Target,
    WrkRun,
    _raise_interrupt,
    _stat_fields,
    check_answers,
    checkout,
    cpu_seconds,
    free_port,
    nginx_binary,
    nginx_config,
    package_env,
    parse_wrk,
    process_tree,
    start_nginx,
    stop,
    wait_for_port,
)

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "workers_bench.json"
#: Every proxy under test may run on both cores; wrk and the backends on CLIENT_CORE.
PROXY_CORES = "0,1"
STORE = "redis://127.0.0.1:6379/12"

BACKEND = "backend directly"
SERVE1 = "balancekit serve --workers 1"
SERVE2 = "balancekit serve --workers 2"
NGINX1 = "nginx worker_processes 1"
NGINX2 = "nginx worker_processes 2"

#: The disruption scenarios, in order: name -> what happens at --event-at.
SCENARIOS = {
    "none (control)": "nothing",
    "SIGKILL one worker": "SIGKILL the first child of the supervisor",
    "SIGHUP, interval 2 -> 3 s": "rewrite the file: health check interval 3 (pool rebuilt)",
    "SIGHUP, weight 1 -> 2": "rewrite the file: the first backend's weight 2 (pool kept)",
    "SIGHUP, broken file": "rewrite the file: an unknown algorithm (reload refused)",
}


# --- processes and /proc ---------------------------------------------------------------


def launch(command: list[str], cores: str, log: Path, env: dict[str, str] | None = None) -> Popen:
    """``spawn`` of proxy_bench with output to ``log`` (unbuffered, so a
    worker's reload line is there at once): a session of its own."""
    with log.open("ab") as out:
        return subprocess.Popen(
            ["taskset", "-c", cores, *command],
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def children(pid: int) -> list[int]:
    """The direct children of ``pid`` (a supervisor's or a master's workers)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int(_stat_fields(int(entry.name))[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == pid:
                found.append(int(entry.name))
    return sorted(found)


def workers_of(pid: int) -> list[int]:
    """The processes that serve: the children, or ``pid`` itself when it has
    none (``serve --workers 1`` serves in the main process)."""
    return children(pid) or [pid]


def wait_for_workers(process: Popen, count: int, timeout: float = 20) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited with {process.returncode}")
        found = children(process.pid)
        if len(found) == count:
            return found
        time.sleep(0.05)
    raise RuntimeError(f"{process.args!r}: not {count} workers after {timeout} s")


def own_cpu(pid: int) -> float:
    """One process's utime + stime in seconds (0 once it is gone)."""
    try:
        fields = _stat_fields(pid)
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK


def redis_pid() -> int | None:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == "redis-server":
                    return int(entry.name)
            except OSError:
                continue
    return None


def _tree_cpu_with_reaped(pid: int) -> float:
    """CPU seconds of ``pid``'s tree, the children it reaped included (a
    supervisor's killed worker)."""
    total = 0
    for p in process_tree(pid):
        try:
            fields = _stat_fields(p)
        except OSError:
            continue
        total += sum(int(fields[i]) for i in (11, 12, 13, 14))
    return total / TICK


def _machine_busy() -> float:
    """CPU seconds the machine spent busy (user, nice, system, irq, softirq)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    return sum(int(fields[i]) for i in (0, 1, 2, 5, 6)) / TICK


class Others:
    """The share of the machine's CPUs that processes other than this
    benchmark's (the target, the backends, wrk, Redis, this script) used
    between ``Others(...)`` and ``share()``: other people's work on a shared
    machine, which the numbers of that run suffer from."""

    def __init__(self, roots: list[int]) -> None:
        self.roots = roots
        self.wall = time.monotonic()
        self.busy = _machine_busy()
        self.ours = self._ours()

    def _ours(self) -> float:
        own = resource.getrusage(resource.RUSAGE_SELF)
        reaped = resource.getrusage(resource.RUSAGE_CHILDREN)  # wrk, once waited for
        return (
            sum(_tree_cpu_with_reaped(pid) for pid in self.roots)
            + own.ru_utime
            + own.ru_stime
            + reaped.ru_utime
            + reaped.ru_stime
        )

    def share(self) -> float:
        others = (_machine_busy() - self.busy) - (self._ours() - self.ours)
        wall = (time.monotonic() - self.wall) * (os.cpu_count() or 1)
        return round(max(0.0, others) / wall, 2)


def _established(port: int) -> set[int]:
    """Socket inodes of the ESTABLISHED connections whose local port is ``port``:
    the server's side of every client connection."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "01" and int(fields[1].rsplit(":", 1)[1], 16) == port:
            inodes.add(int(fields[9]))
    return inodes


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return inodes
    for fd in fds:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(int(link[8:-1]))
    return inodes


def connections_per_worker(port: int, workers: list[int]) -> dict[int, int]:
    """How many client connections on ``port`` each worker holds now."""
    established = _established(port)
    return {pid: len(_socket_inodes(pid) & established) for pid in workers}


def flush_redis() -> None:
    import redis

    client = redis.Redis.from_url(STORE, socket_timeout=5)
    try:
        client.flushdb()
    finally:
        client.close()


# --- wrk ----------------------------------------------------------------------------


@dataclass
class WrkResult:
    run: WrkRun
    non_2xx: int
    connect: int
    read: int
    write: int
    timeout: int
    #: wrk's summary lines, as it printed them.
    says: list[str]


def start_wrk(url: str, seconds: float, connections: int) -> Popen:
    command = ["taskset", "-c", CLIENT_CORE, "wrk", "-t1", f"-c{connections}",
               f"-d{seconds}s", "--latency", url]  # fmt: skip
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )


def finish_wrk(process: Popen, seconds: float) -> WrkResult:
    out, err = process.communicate(timeout=seconds + 30)
    text = out.decode()
    if process.returncode != 0:
        raise RuntimeError(f"wrk failed ({process.returncode}): {err.decode() or text}")
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text
    )
    connect, read, write, timeout = map(int, errors.groups()) if errors else (0, 0, 0, 0)
    says = [
        line.strip()
        for line in text.splitlines()
        if re.search(r"requests in|Socket errors|Non-2xx|Requests/sec", line)
    ]
    return WrkResult(
        parse_wrk(text),
        int(non_2xx.group(1)) if non_2xx else 0,
        connect,
        read,
        write,
        timeout,
        says,
    )


class Bench:
    """The processes started so far (each stopped by PID at the end) and the
    temporary directory they use."""

    def __init__(self, args: argparse.Namespace, prefix: Path) -> None:
        self.args = args
        self.prefix = prefix
        self.processes: list[Popen] = []
        self.env = package_env(args.checkout)
        self.nginx = nginx_binary() or ""
        self.backend_ports = [free_port() for _ in range(N_BACKENDS)]
        self.backends: Popen | None = None
        self.redis = redis_pid()
        self.load_average = [round(x, 2) for x in os.getloadavg()]

    def roots(self, target: int) -> list[int]:
        """The process trees that are this benchmark's during a run of ``target``."""
        assert self.backends is not None
        return [target, self.backends.pid, *([self.redis] if self.redis else [])]

    def wrk(self, url: str, seconds: float) -> WrkResult:
        process = start_wrk(url, seconds, self.args.connections)
        self.processes.append(process)
        try:
            return finish_wrk(process, seconds)
        finally:
            self.processes.remove(process)

    def start_backends(self) -> None:
        prefix = self.prefix / "backends"
        self.backends = start_nginx(self.nginx, 0, self.backend_ports, prefix, static=True)
        self.processes.append(self.backends)
        for port in self.backend_ports:
            wait_for_port(port, self.backends)

    @property
    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{p}" for p in self.backend_ports]

    def start_serve(self, config: Path, port: int, workers: int, log: Path) -> Popen:
        command = [sys.executable, "-m", "balancekit", "serve", str(config),
                   "--port", str(port), "--workers", str(workers)]  # fmt: skip
        process = launch(command, PROXY_CORES, log, self.env)
        self.processes.append(process)
        wait_for_port(port, process)
        if workers > 1:
            wait_for_workers(process, workers)
        return process

    def start_nginx_proxy(self, port: int, workers: int) -> Popen:
        prefix = self.prefix / f"proxy-{workers}"
        prefix.mkdir(parents=True, exist_ok=True)
        conf = prefix / "nginx.conf"
        conf.write_text(nginx_proxy_config(port, self.backend_ports, prefix, workers))
        command = [self.nginx, "-p", str(prefix), "-e", str(prefix / "error.log"),
                   "-c", str(conf), "-g", "daemon off;"]  # fmt: skip
        process = launch(command, PROXY_CORES, prefix / "stdout.log")
        self.processes.append(process)
        wait_for_port(port, process)
        wait_for_workers(process, workers)
        return process

    def stop(self, process: Popen) -> None:
        stop([process])
        self.processes.remove(process)


# --- configuration files ------------------------------------------------------------


def nginx_proxy_config(port: int, backend_ports: list[int], prefix: Path, workers: int) -> str:
    """proxy_bench's NGINX proxy with ``worker_processes`` set to ``workers``."""
    text = nginx_config(port, backend_ports, prefix)
    if "worker_processes 1;" not in text:
        raise RuntimeError("proxy_bench.nginx_config no longer says worker_processes 1")
    return text.replace("worker_processes 1;", f"worker_processes {workers};", 1)


def serve_config(path: Path, urls: list[str], variant: str = "") -> None:
    """proxy_bench's serve configuration (``write_serve_config``: the default
    transport, round robin, an HTTP health check every 2 s, the status page)
    over the Redis store, and its variants for a reload: ``interval`` (3 s),
    ``weight`` (the first backend's 2), ``broken`` (an unknown algorithm).

    Written here rather than by ``write_serve_config``, which imports
    ``_apps`` and so balancekit in this process, from the working tree even
    with --checkout. Written to a temporary file and renamed, so a reload
    never reads half a file."""
    weights = [2 if variant == "weight" and i == 0 else 1 for i in range(len(urls))]
    backends = ", ".join(
        f'{{ url = "{u}", weight = {w} }}' for u, w in zip(urls, weights, strict=True)
    )
    algorithm = "no_such_algorithm" if variant == "broken" else "round_robin"
    interval = 3 if variant == "interval" else 2
    scratch = path.with_suffix(".tmp")
    scratch.write_text(
        f'store = "{STORE}"\n'
        'transport = "httptools"\n'
        "[pools.p]\n"
        f"backends = [{backends}]\n"
        f'algorithm = "{algorithm}"\n'
        f'health_check = {{ type = "http", path = "/health", interval = {interval} }}\n'
        '[[routes]]\nprefix = "/"\npool = "p"\n'
        '[status]\nenabled = true\npath = "/_balancekit/"\n'
    )
    os.replace(scratch, path)


# --- 1. throughput ------------------------------------------------------------------


@dataclass
class Subject(Target):
    workers: int = 1
    #: Per measured round: each worker's share of the tree's CPU, the client
    #: connections each held half-way, the Redis server's CPU us per request.
    cpu_split: list[list[float]] = field(default_factory=list)
    connections_split: list[list[int]] = field(default_factory=list)
    redis_us: list[float] = field(default_factory=list)
    #: Per measured round: the share of the machine's CPUs others used (Others).
    others: list[float] = field(default_factory=list)


def measure(bench: Bench, subject: Subject, seconds: int) -> None:
    bench.wrk(subject.url, 1)  # warm up: connections, pools, caches
    pid = subject.process.pid
    workers = workers_of(pid)
    tree_before = cpu_seconds(pid)
    each_before = [own_cpu(w) for w in workers]
    redis_before = own_cpu(bench.redis) if bench.redis else 0.0
    others = Others(bench.roots(pid))
    process = start_wrk(subject.url, seconds, bench.args.connections)
    bench.processes.append(process)
    try:
        time.sleep(seconds / 2)
        # A backend's port also carries the idle proxies' upstream connections.
        held = connections_per_worker(subject.port, workers) if subject.name != BACKEND else {}
        result = finish_wrk(process, seconds)
    finally:
        bench.processes.remove(process)
    subject.others.append(others.share())
    requests = max(result.run.requests, 1)
    used = cpu_seconds(pid) - tree_before
    each = [own_cpu(w) - before for w, before in zip(workers, each_before, strict=True)]
    subject.runs.append(result.run)
    subject.cpu_us.append(used / requests * 1e6)
    subject.cpu_split.append([round(c / (sum(each) or 1), 2) for c in each])
    if held:
        subject.connections_split.append([held[w] for w in workers])
    if bench.redis:
        subject.redis_us.append((own_cpu(bench.redis) - redis_before) / requests * 1e6)


def start_subjects(bench: Bench) -> list[Subject]:
    assert bench.backends is not None
    subjects = [Subject(BACKEND, bench.backend_ports[0], bench.backends)]
    config = bench.prefix / "serve.toml"
    serve_config(config, bench.urls)
    for name, workers in ((SERVE1, 1), (SERVE2, 2)):
        port = free_port()
        log = bench.prefix / f"serve-{workers}.log"
        subjects.append(
            Subject(name, port, bench.start_serve(config, port, workers, log), workers=workers)
        )
    for name, workers in ((NGINX1, 1), (NGINX2, 2)):
        port = free_port()
        subjects.append(
            Subject(name, port, bench.start_nginx_proxy(port, workers), workers=workers)
        )
    for subject in subjects:
        check_answers(subject, is_proxy=subject.name != BACKEND)
    return subjects


Row = dict[str, object]


def summarize(subjects: list[Subject]) -> dict[str, Row]:
    rows: dict[str, Row] = {}
    for s in subjects:
        rows[s.name] = {
            "requests_per_s": round(statistics.median(r.rps for r in s.runs)),
            "cpu_us_per_request": round(statistics.median(s.cpu_us), 1),
            "p99_ms": round(statistics.median(r.p99_ms for r in s.runs), 2),
            "failed": sum(r.failed for r in s.runs),
            "redis_cpu_us_per_request": round(statistics.median(s.redis_us), 1)
            if s.redis_us
            else None,
            "rounds_requests_per_s": [round(r.rps) for r in s.runs],
            "rounds_others_cpu_share": s.others,
            "rounds_cpu_us_per_request": [round(c, 1) for c in s.cpu_us],
            "rounds_worker_cpu_share": s.cpu_split,
            "rounds_connections_per_worker": s.connections_split,
        }
    return rows


def ratios(rows: dict[str, Row]) -> dict[str, dict[str, float]]:
    def ratio(a: str, b: str) -> dict[str, float]:
        ra, rb = rows[a], rows[b]
        return {
            "requests_per_s": round(float(ra["requests_per_s"]) / float(rb["requests_per_s"]), 2),  # type: ignore[arg-type]
            "cpu_us_per_request": round(
                float(ra["cpu_us_per_request"]) / float(rb["cpu_us_per_request"]),  # type: ignore[arg-type]
                2,
            ),
        }

    return {
        "balancekit workers 2 / workers 1": ratio(SERVE2, SERVE1),
        "nginx workers 2 / workers 1": ratio(NGINX2, NGINX1),
        "balancekit / nginx, 1 worker": ratio(SERVE1, NGINX1),
        "balancekit / nginx, 2 workers": ratio(SERVE2, NGINX2),
        "nginx 2 workers / backend directly": ratio(NGINX2, BACKEND),
    }


def _splits(values: list[list[float]] | list[list[int]]) -> str:
    if not values:
        return "-"
    return " ; ".join("/".join(str(v) for v in round_) for round_ in values)


def print_throughput(rows: dict[str, Row], ratio_rows: dict[str, dict[str, float]]) -> None:
    print("\n## Throughput (median of the rounds)\n")
    print(
        "| target | req/s | CPU us/req | p99 ms | failed | Redis CPU us/req "
        "| worker CPU share, per round | connections per worker, per round | req/s per round "
        "| others' CPU share, per round |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- | --- | --- | --- |")
    for name, row in rows.items():
        redis_us = row["redis_cpu_us_per_request"]
        print(
            f"| {name} | {row['requests_per_s']:,} | {row['cpu_us_per_request']} "
            f"| {row['p99_ms']} | {row['failed']} | {'-' if redis_us is None else redis_us} "
            f"| {_splits(row['rounds_worker_cpu_share'])} "  # type: ignore[arg-type]
            f"| {_splits(row['rounds_connections_per_worker'])} "  # type: ignore[arg-type]
            f"| {', '.join(f'{v:,}' for v in row['rounds_requests_per_s'])} "  # type: ignore[attr-defined]
            f"| {', '.join(map(str, row['rounds_others_cpu_share']))} |"  # type: ignore[call-overload]
        )
    print(
        "\nothers' CPU share: the share of the machine's CPUs used by processes that are not"
        " this benchmark's during the run (0.25: half a core of 2)."
    )
    print("\n| ratio | req/s | CPU us/req |")
    print("| --- | ---: | ---: |")
    for name, r in ratio_rows.items():
        print(f"| {name} | {r['requests_per_s']} | {r['cpu_us_per_request']} |")


# --- 2. and 3. disruption -----------------------------------------------------------


def _log_lines(log: Path, start: int) -> list[str]:
    return [line for line in log.read_text(errors="replace")[start:].splitlines() if line]


def _wait_for_log(log: Path, start: int, pattern: str, count: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sum(bool(re.search(pattern, line)) for line in _log_lines(log, start)) >= count:
            return True
        time.sleep(0.05)
    return False


def _sleep_until(moment: float) -> None:
    time.sleep(max(0.0, moment - time.monotonic()))


def disrupt(bench: Bench, scenario: str, index: int) -> Row:
    args = bench.args
    config = bench.prefix / f"disrupt-{index}.toml"
    log = bench.prefix / f"disrupt-{index}.log"
    serve_config(config, bench.urls)
    port = free_port()
    process = bench.start_serve(config, port, 2, log)
    row: Row = {"scenario": scenario, "event": SCENARIOS[scenario]}
    try:
        url = f"http://127.0.0.1:{port}/bench?q=1"
        check_answers(Subject(scenario, port, process), is_proxy=True)
        bench.wrk(url, 1)  # warm up
        before = children(process.pid)
        mark = log.stat().st_size
        others = Others(bench.roots(process.pid))
        load = start_wrk(url, args.disrupt_duration, args.connections)
        bench.processes.append(load)
        started = time.monotonic()
        event_at = started + args.event_at
        _sleep_until(event_at - 0.5)
        row["connections_per_worker_before"] = connections_per_worker(port, before)
        _sleep_until(event_at)
        if scenario.startswith("SIGKILL"):
            victim = before[0]
            os.kill(victim, signal.SIGKILL)
            killed = time.monotonic()
            row["killed_pid"] = victim
            replacement, appeared = None, None
            deadline = killed + 10
            while time.monotonic() < deadline and load.poll() is None:
                new = [pid for pid in children(process.pid) if pid not in before]
                if new:
                    replacement, appeared = new[0], round(time.monotonic() - killed, 3)
                    break
                time.sleep(0.01)
            row["replacement_pid"] = replacement
            row["replacement_appeared_after_s"] = appeared
        elif scenario.startswith("SIGHUP"):
            variant = {"interval": "interval", "weight": "weight", "broken": "broken"}
            word = next(key for key in variant if key in scenario)
            serve_config(config, bench.urls, variant[word])
            os.kill(process.pid, signal.SIGHUP)
            if word == "broken":
                _wait_for_log(log, mark, r"^supervisor: reload of .* refused", 1, 5)
            else:
                _wait_for_log(log, mark, r"configuration reloaded", 3, 5)
        _sleep_until(min(event_at + 4, started + args.disrupt_duration - 0.5))
        now = children(process.pid)
        row["connections_per_worker_after"] = connections_per_worker(port, now)
        cpu_after = {pid: own_cpu(pid) for pid in now}
        result = finish_wrk(load, args.disrupt_duration)
        bench.processes.remove(load)
        row["others_cpu_share"] = others.share()
        after = children(process.pid)
        row["worker_cpu_s_at_event_plus_4"] = {p: round(c, 2) for p, c in cpu_after.items()}
        row["worker_cpu_s_at_end"] = {pid: round(own_cpu(pid), 2) for pid in after}
        row.update(
            {
                "completed": result.run.requests,
                "requests_per_s": round(result.run.rps),
                "non_2xx": result.non_2xx,
                "connect": result.connect,
                "read": result.read,
                "write": result.write,
                "timeout": result.timeout,
                "wrk_says": result.says,
                "workers_before": before,
                "workers_after": after,
            }
        )
        try:
            check_answers(Subject(scenario, port, process), is_proxy=True)
            row["answers_after"] = "200, every backend"
        except (RuntimeError, httpx.HTTPError) as exc:
            row["answers_after"] = f"FAILED: {exc}"
        row["log"] = [line for line in _log_lines(log, mark) if "Traceback" not in line][:40]
        row["tracebacks_in_log"] = sum("Traceback" in line for line in _log_lines(log, 0))
    finally:
        bench.stop(process)
    return row


def _outcome(row: Row) -> str:
    log = row["log"]
    assert isinstance(log, list)
    if str(row["scenario"]).startswith("SIGKILL"):
        held = row["connections_per_worker_before"]
        assert isinstance(held, dict)
        killed = f"killed pid {row['killed_pid']} (held {held[row['killed_pid']]} connections); "
        if row["replacement_pid"] is None:
            return killed + "NO new worker"
        return (
            killed + f"new pid {row['replacement_pid']} after "
            f"{row['replacement_appeared_after_s']} s"
        )
    if str(row["scenario"]).startswith("SIGHUP"):
        reloaded = sum("configuration reloaded" in line for line in log)
        refused = sum("refused" in line for line in log)
        kept = "kept" if row["workers_before"] == row["workers_after"] else "CHANGED"
        return f"{reloaded} 'reloaded' lines, {refused} 'refused'; workers {kept}"
    return "-"


def print_disruption(rows: list[Row]) -> None:
    print("\n## Disruption under load (serve --workers 2, wrk -c32)\n")
    print(
        "| event | completed | req/s | non-2xx | connect | read | write | timeout "
        "| outcome | connections per worker before -> 4 s after | answers after | others' CPU |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | --- | ---: |")
    for row in rows:
        held_before = row["connections_per_worker_before"]
        held_after = row["connections_per_worker_after"]
        assert isinstance(held_before, dict) and isinstance(held_after, dict)
        split = (
            f"{'/'.join(map(str, held_before.values()))} -> "
            f"{'/'.join(f'{v} (pid {p})' for p, v in held_after.items())}"
        )
        print(
            f"| {row['scenario']} | {row['completed']:,} | {row['requests_per_s']:,} "
            f"| {row['non_2xx']} | {row['connect']} | {row['read']} | {row['write']} "
            f"| {row['timeout']} | {_outcome(row)} | {split} | {row['answers_after']} "
            f"| {row['others_cpu_share']} |"
        )
    for row in rows:
        print(f"\n{row['scenario']}: wrk says: {' | '.join(row['wrk_says'])}")  # type: ignore[arg-type]
        for line in row["log"]:  # type: ignore[attr-defined]
            print(f"    {line}")


# --- main ---------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--duration", type=int, default=5, help="seconds per run (default 5)")
    parser.add_argument("--connections", type=int, default=32, help="wrk -c (default 32)")
    parser.add_argument(
        "--disrupt-duration", type=int, default=10, help="seconds of load per event (default 10)"
    )
    parser.add_argument(
        "--event-at", type=float, default=3.0, help="seconds into the load (default 3)"
    )
    parser.add_argument(
        "--repeat", type=int, default=1, help="runs of every disruption event (default 1)"
    )
    parser.add_argument("--quick", action="store_true", help="1 round of 2 s, events in 6 s")
    parser.add_argument(
        "--checkout",
        type=Path,
        default=ROOT,
        metavar="DIR",
        help="import balancekit from DIR (default: this working tree)",
    )
    parser.add_argument("--output", type=Path, default=RESULTS, help=f"default {RESULTS}")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.duration, args.disrupt_duration = 1, 2, 6
    if not 1 <= args.event_at <= args.disrupt_duration - 2:
        parser.error("--event-at: between 1 and --disrupt-duration - 2")
    args.checkout = args.checkout.resolve()
    return args


def run(bench: Bench) -> dict[str, object]:
    args = bench.args
    package = checkout(args.checkout)  # before any server: the package measured
    flush_redis()
    bench.start_backends()
    subjects = start_subjects(bench)
    print(f"all {len(subjects)} targets answer 200", file=sys.stderr)
    for round_ in range(args.rounds):
        for subject in subjects:
            measure(bench, subject, args.duration)
        print(f"round {round_ + 1}/{args.rounds} done", file=sys.stderr)
    rows = summarize(subjects)
    ratio_rows = ratios(rows)
    for subject in subjects[1:]:
        bench.stop(subject.process)
    print_throughput(rows, ratio_rows)
    disruption = []
    for repeat in range(args.repeat):
        for index, scenario in enumerate(SCENARIOS):
            disruption.append(disrupt(bench, scenario, len(SCENARIOS) * repeat + index))
            print(f"{scenario} done ({repeat + 1}/{args.repeat})", file=sys.stderr)
    print_disruption(disruption)
    wrk_version = subprocess.run(["wrk", "-v"], capture_output=True, text=True, timeout=10)
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load_average_at_start": bench.load_average,
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "nginx": subprocess.run(
            [bench.nginx, "-v"], capture_output=True, text=True, timeout=10
        ).stderr.strip(),
        "wrk": (wrk_version.stdout or wrk_version.stderr).splitlines()[0],
        "store": STORE,
        "pinning": {"proxies": PROXY_CORES, "wrk -t1 and backends": CLIENT_CORE},
        "rounds": args.rounds,
        "duration_s": args.duration,
        "connections": args.connections,
        "disrupt_duration_s": args.disrupt_duration,
        "event_at_s": args.event_at,
        "repeat": args.repeat,
        "balancekit": package,
        "throughput": rows,
        "ratios": ratio_rows,
        "disruption": disruption,
    }


def main() -> None:
    args = parse_args()
    for tool in ("wrk", "taskset"):
        if shutil.which(tool) is None:
            sys.exit("wrk and taskset are needed: apt-get install wrk util-linux")
    if nginx_binary() is None:
        sys.exit("nginx is needed (backends and reference): apt-get install nginx-light")
    try:
        flush_redis()
    except Exception as exc:
        sys.exit(f"Redis at {STORE} is needed: {exc}")
    signal.signal(signal.SIGTERM, _raise_interrupt)
    prefix = Path(tempfile.mkdtemp(prefix="balancekit-workers-bench-", dir="/tmp"))
    bench = Bench(args, prefix)
    started = time.monotonic()
    try:
        summary = run(bench)
    finally:
        stop(bench.processes)
        shutil.rmtree(prefix, ignore_errors=True)
        try:
            flush_redis()
        except Exception as exc:
            print(f"could not flush {STORE}: {exc}", file=sys.stderr)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nwritten to {args.output} ({time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
