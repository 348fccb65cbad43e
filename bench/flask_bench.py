"""How fast is Flask + balancekit under gunicorn, next to a hand-written Flask proxy?

The project's target: Flask with balancekit serves at least 0.9x the
requests/s of a hand-written Flask proxy view using the same HTTP client
(urllib3), both under gunicorn's gthread worker.

Method (placement as in ``proxy_bench.py``). Two fast backends (a raw ASGI
app answering 100 bytes, uvicorn + httptools, one worker each) and wrk
(-t1 -c16, keep-alive) share one core; every target runs alone on the other
core, as ``gunicorn --worker-class gthread --workers 1 --threads 16``, so
each is limited by its own CPU and all get the same one. Targets (the apps
are in ``_flask_apps.py``):

- ``balancekit_app``: ``BalanceKit(app)`` with a configuration route for
  every path, so balancekit's WSGI middleware in front of Flask proxies each
  request (round robin over the two backends, urllib3 engine),
- ``balancekit_view_app``: the same pool from a ``kit.proxy("/")`` Flask view,
  so each request also goes through Flask's routing and request context,
- ``reference_app``: a minimal, honest hand-written Flask proxy view with one
  urllib3 ``HTTPConnectionPool`` per backend: the yardstick.

Before measuring, each target must answer 200 with the backend's body from
both backends, so an error page is never benchmarked. Targets run in
interleaved rounds (round 1: every target, round 2: every target, ...) so
drift on the machine hits them alike; each run is preceded by a 1 s
unmeasured wrk warm-up. Per target, over the rounds:

- requests/s: the median round, and its ratio to the reference,
- CPU us per request: utime + stime of gunicorn's process tree (master and
  worker, from /proc) over the measured run, divided by the requests wrk
  completed; median round, and its ratio to the reference (lower is better),
- p99 latency (median round), peak RSS of the tree, and failed requests
  (non-2xx and socket errors, summed; anything but 0 makes the numbers
  suspect).

Every server is a subprocess of this script, pinned with taskset, stopped by
PID on exit (also on Ctrl-C, SIGTERM or an error). Nothing is written to disk.

    .venv/bin/python bench/flask_bench.py            # 3 rounds of 5 s, about 1.5 min
    .venv/bin/python bench/flask_bench.py --quick    # 1 round of 2 s
    .venv/bin/python bench/flask_bench.py --json     # the summary as JSON on stdout
    .venv/bin/python bench/flask_bench.py --profile  # then py-spy on balancekit_app
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from proxy_bench import (
    BODY,
    CLIENT_CORE,
    PROXY_CORE,
    Popen,
    Target,
    _raise_interrupt,
    free_port,
    measure,
    peak_rss_mb,
    print_profile,
    process_tree,
    spawn,
    start_uvicorn,
    stop,
    wait_for_port,
    wrk,
)

HERE = Path(__file__).resolve().parent
N_BACKENDS = 2
THREADS = 16

REFERENCE = "reference Flask view"
BALANCEKIT = "balancekit (middleware)"
BALANCEKIT_VIEW = "balancekit (kit.proxy view)"
#: Target name -> the WSGI app gunicorn serves.
APPS = {
    REFERENCE: "_flask_apps:reference_app",
    BALANCEKIT: "_flask_apps:balancekit_app",
    BALANCEKIT_VIEW: "_flask_apps:balancekit_view_app",
}

#: The project's target: balancekit's requests/s next to the reference's.
MIN_X_REFERENCE = 0.9

Row = dict[str, object]


# --- processes ----------------------------------------------------------------------


def start_gunicorn(app: str, port: int, env: dict[str, str]) -> Popen:
    command = [
        sys.executable, "-m", "gunicorn", "--worker-class", "gthread", "--workers", "1",
        "--threads", str(THREADS), "--bind", f"127.0.0.1:{port}", "--chdir", str(HERE),
        "--log-level", "warning", app,
    ]  # fmt: skip
    return spawn(command, PROXY_CORE, env)


def check_answers(target: Target) -> None:
    """Refuse to benchmark error pages: 200, the backend's body, both backends used."""
    seen: set[str] = set()
    with httpx.Client(timeout=5) as client:
        for _ in range(3 * N_BACKENDS):
            response = client.get(target.url)
            if response.status_code != 200 or response.content != BODY:
                raise RuntimeError(
                    f"{target.name} answered {response.status_code}: {response.text[:300]!r}"
                )
            seen.add(response.headers.get("x-backend", "?"))
    if len(seen) != N_BACKENDS:
        raise RuntimeError(f"{target.name} reached backends {sorted(seen)}, not both")


def start_targets(processes: list[Popen]) -> list[Target]:
    """Start backends and targets, appending each process to ``processes`` at once."""
    backend_ports = [free_port() for _ in range(N_BACKENDS)]
    for i, port in enumerate(backend_ports):
        env = {"BENCH_NAME": f"backend-{i + 1}"}
        processes.append(start_uvicorn("_apps:backend", port, CLIENT_CORE, env))
    env = {"BENCH_BACKENDS": ",".join(f"http://127.0.0.1:{p}" for p in backend_ports)}
    targets = []
    for name, app in APPS.items():
        port = free_port()
        processes.append(start_gunicorn(app, port, env))
        targets.append(Target(name, port, processes[-1]))
    for port, process in zip(backend_ports, processes[:N_BACKENDS], strict=True):
        wait_for_port(port, process)
    for target in targets:
        wait_for_port(target.port, target.process)
        check_answers(target)
    return targets


# --- report -------------------------------------------------------------------------


def _ratio(value: float, reference: float) -> float:
    return round(value / reference, 3) if reference else float("nan")


def summarize(targets: list[Target]) -> dict[str, Row]:
    rps = {t.name: statistics.median(r.rps for r in t.runs) for t in targets}
    cpu = {t.name: statistics.median(t.cpu_us) for t in targets}
    rows: dict[str, Row] = {}
    for t in targets:
        rows[t.name] = {
            "requests_per_s": round(rps[t.name]),
            "x_reference": _ratio(rps[t.name], rps[REFERENCE]),
            "cpu_us_per_request": round(cpu[t.name], 1),
            "cpu_x_reference": _ratio(cpu[t.name], cpu[REFERENCE]),
            "p99_ms": round(statistics.median(r.p99_ms for r in t.runs), 2),
            "peak_rss_mb": round(peak_rss_mb(t.process.pid), 1),
            "failed": sum(r.failed for r in t.runs),
            "rounds_requests_per_s": [round(r.rps) for r in t.runs],
            "rounds_cpu_us_per_request": [round(c, 1) for c in t.cpu_us],
        }
    return rows


def verdict(rows: dict[str, Row], name: str) -> dict[str, object]:
    x_ref = rows[name]["x_reference"]
    met = isinstance(x_ref, float) and x_ref >= MIN_X_REFERENCE
    return {"target": name, "x_reference": x_ref, "min": MIN_X_REFERENCE, "met": met}


COLUMNS = [
    ("req/s", "requests_per_s"),
    ("x ref", "x_reference"),
    ("CPU us/req", "cpu_us_per_request"),
    ("CPU x ref", "cpu_x_reference"),
    ("p99 ms", "p99_ms"),
    ("peak RSS MB", "peak_rss_mb"),
    ("failed", "failed"),
]


def print_table(rows: dict[str, Row]) -> None:
    """A markdown table, one row per target."""
    header = ["target", *(title for title, _ in COLUMNS)]
    table = [[name, *(str(row[key]) for _, key in COLUMNS)] for name, row in rows.items()]
    widths = [max(len(line[i]) for line in [header, *table]) for i in range(len(header))]
    rule = ["-" * widths[0], *("-" * (w - 1) + ":" for w in widths[1:])]
    for line in [header, rule, *table]:
        cells = [line[0].ljust(widths[0])]
        cells += [cell.rjust(width) for cell, width in zip(line[1:], widths[1:], strict=True)]
        print("| " + " | ".join(cells) + " |")


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for package in ("flask", "werkzeug", "gunicorn", "urllib3"):
        found[package] = version(package)
    return found


# --- profile ------------------------------------------------------------------------


def profile(target: Target, seconds: int, connections: int, output: Path) -> None:
    """Sample the gunicorn worker of ``target`` with py-spy during an extra,
    unmeasured wrk run; print balancekit's functions by share of the samples."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(py_spy).exists():
        sys.exit("--profile needs py-spy: pip install py-spy")
    workers = process_tree(target.process.pid)[1:]
    if len(workers) != 1:
        raise RuntimeError(f"{target.name}: expected one gunicorn worker, found {workers}")
    # --gil: only the thread holding the GIL, so threads waiting on a socket
    # (most of them, most of the time) do not pose as CPU time.
    command = ["taskset", "-c", CLIENT_CORE, py_spy, "record", "--format", "raw", "--gil",
               "--rate", "250", "--nonblocking", "--duration", str(seconds),
               "--pid", str(workers[0]), "-o", str(output)]  # fmt: skip
    spy = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        wrk(target.url, seconds, connections)
        spy.wait(timeout=seconds + 30)
    finally:
        stop([spy])
    print(f"\npy-spy of {target.name}'s worker (GIL holder):")
    print_profile(output.read_text())


# --- main ---------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--seconds", type=int, default=5, help="seconds per run (default 5)")
    parser.add_argument("--connections", type=int, default=16, help="wrk -c (default 16)")
    parser.add_argument("--quick", action="store_true", help="1 round of 2 s")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument(
        "--profile", action="store_true", help="then sample balancekit_app with py-spy"
    )
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.seconds = 1, 2
    return args


def run(args: argparse.Namespace, processes: list[Popen]) -> dict[str, object]:
    targets = start_targets(processes)
    print(f"all {len(targets)} targets answer 200 from both backends", file=sys.stderr)
    for round_ in range(args.rounds):
        for target in targets:
            measure(target, args.seconds, args.connections)
        print(f"round {round_ + 1}/{args.rounds} done", file=sys.stderr)
    rows = summarize(targets)
    summary: dict[str, object] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "versions": versions(),
        "cpus": os.cpu_count(),
        "rounds": args.rounds,
        "seconds": args.seconds,
        "connections": args.connections,
        "gunicorn": f"gthread, 1 worker, {THREADS} threads",
        "targets": rows,
        "verdicts": [verdict(rows, BALANCEKIT), verdict(rows, BALANCEKIT_VIEW)],
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print_table(rows)
        print()
        for check in (verdict(rows, BALANCEKIT), verdict(rows, BALANCEKIT_VIEW)):
            met = "MET" if check["met"] else "MISSED"
            print(
                f"{met}: {check['target']} serves {check['x_reference']}x the reference's "
                f"requests/s (target >= {MIN_X_REFERENCE}x)"
            )
        print(", ".join(f"{name} {v}" for name, v in versions().items()))
    if args.profile:
        by_name = {t.name: t for t in targets}
        with tempfile.TemporaryDirectory(prefix="balancekit-flask-bench-") as folder:
            output = Path(folder) / "balancekit.pyspy.txt"
            # With --json, stdout holds only the JSON.
            with contextlib.redirect_stdout(sys.stderr if args.json else sys.stdout):
                profile(by_name[BALANCEKIT], max(args.seconds, 5), args.connections, output)
    return summary


def main() -> None:
    args = parse_args()
    if shutil.which("wrk") is None or shutil.which("taskset") is None:
        sys.exit("wrk and taskset are needed: apt-get install wrk util-linux")
    signal.signal(signal.SIGTERM, _raise_interrupt)
    processes: list[Popen] = []
    started = time.monotonic()
    try:
        run(args, processes)
    finally:
        stop(processes)
    print(f"done in {time.monotonic() - started:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
