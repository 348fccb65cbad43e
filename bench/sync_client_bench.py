"""Which HTTP client for balancekit's sync (WSGI) engine: httpx or urllib3?

One upstream (``_apps.backend``, 100 bytes, uvicorn + httptools) runs on core 1;
this process, pinned to core 0, sends GETs from 1 or 16 threads sharing ONE
client object, as a threaded WSGI server's workers would, each request made
as a streaming proxy makes it: explicit Host and X-Forwarded-For, no
redirects, retries or environment proxies, the body read raw as it arrives,
the connection handed back to the pool.

- httpx: ``client.send(request, stream=True)``, ``iter_raw()``, ``close()``.
- urllib3 (PoolManager): ``urlopen(..., preload_content=False)``, ``read1(65536)``
  until empty (``read1`` returns what has arrived; ``read(65536)`` and
  ``stream(65536)`` wait for 64 KiB or the end), ``release_conn()``.
- urllib3 (pool): the same on one ``HTTPConnectionPool`` per backend, what a
  proxy with a fixed backend list keeps (no URL parsing or pool lookup).

Each cell (client, threads) runs ``--seconds`` (at most 200,000 requests)
after a 0.3 s unmeasured warm-up; cells run interleaved for 3 rounds and the
median round is reported. CPU us/request: ``time.process_time()`` of this
process over the run / requests. Anything but a 200 with the 100-byte body
counts as an error.

    .venv/bin/python bench/sync_client_bench.py            # 3 rounds of 5 s, about 2 min
    .venv/bin/python bench/sync_client_bench.py --quick    # 1 round of 2 s
    .venv/bin/python bench/sync_client_bench.py --seconds 10 --json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import urllib3

sys.path.insert(0, str(Path(__file__).resolve().parent))
from proxy_bench import BODY, free_port, start_uvicorn, stop, wait_for_port

CLIENT_CORE, UPSTREAM_CORE = 0, "1"
THREADS = (1, 16)
CAP = 200_000
WARM_UP = 0.3

Send = Callable[[], bool]  # one proxied request; True if 200 + the expected body


def httpx_sender(url: str, host: bytes) -> tuple[Send, Callable[[], None]]:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=100)
    client = httpx.Client(limits=limits, follow_redirects=False, trust_env=False)
    headers = [(b"host", host), (b"x-forwarded-for", b"127.0.0.1")]

    def send() -> bool:
        response = client.send(httpx.Request("GET", url, headers=headers), stream=True)
        try:
            chunks = []
            for chunk in response.iter_raw():  # a proxy writes each on at once
                chunks.append(chunk)
        finally:
            response.close()
        return response.status_code == 200 and b"".join(chunks) == BODY

    return send, client.close


def urllib3_sender(url: str, host: bytes, per_backend: bool) -> tuple[Send, Callable[[], None]]:
    pool: urllib3.PoolManager | urllib3.HTTPConnectionPool
    if per_backend:  # one HTTPConnectionPool per backend, requests by path
        name, port = host.decode().rsplit(":", 1)
        pool = urllib3.HTTPConnectionPool(name, int(port), maxsize=100, block=False)
        url, close = "/x", pool.close
    else:
        pool = urllib3.PoolManager(maxsize=100, block=False, retries=False)
        close = pool.clear
    headers = {"host": host.decode(), "x-forwarded-for": "127.0.0.1"}

    def send() -> bool:
        response = pool.urlopen(
            "GET", url, headers=headers, preload_content=False,
            decode_content=False, redirect=False, retries=False,
        )  # fmt: skip
        try:
            chunks = []
            while chunk := response.read1(65536):
                chunks.append(chunk)
        finally:
            response.release_conn()
        return response.status == 200 and b"".join(chunks) == BODY

    return send, close


CLIENTS: dict[str, Callable[[str, bytes], tuple[Send, Callable[[], None]]]] = {
    "httpx": httpx_sender,
    "urllib3 (PoolManager)": lambda url, host: urllib3_sender(url, host, per_backend=False),
    "urllib3 (pool)": lambda url, host: urllib3_sender(url, host, per_backend=True),
}


@dataclass
class Cell:
    client: str
    threads: int
    rps: list[float] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)
    requests: int = 0
    errors: int = 0


def drive(send: Send, threads: int, seconds: float, cap: int) -> tuple[int, int, float, float]:
    """Requests done, errors, wall seconds, CPU seconds of this process."""
    done, errors = [0] * threads, [0] * threads
    start = threading.Barrier(threads + 1)
    deadline = [0.0]

    def worker(i: int) -> None:
        start.wait()
        for _ in range(cap // threads):
            if time.monotonic() >= deadline[0]:
                break
            try:
                ok = send()
            except Exception:
                ok = False
            done[i] += 1
            errors[i] += not ok

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for thread in pool:
        thread.start()
    cpu0, wall0 = time.process_time(), time.monotonic()
    deadline[0] = wall0 + seconds
    start.wait()
    for thread in pool:
        thread.join()
    return sum(done), sum(errors), time.monotonic() - wall0, time.process_time() - cpu0


def run_cell(cell: Cell, url: str, host: bytes, seconds: float) -> None:
    send, close = CLIENTS[cell.client](url, host)
    try:
        drive(send, cell.threads, WARM_UP, CAP)
        n, errors, wall, cpu = drive(send, cell.threads, seconds, CAP)
    finally:
        close()
    cell.rps.append(n / wall)
    cell.cpu_us.append(cpu / max(n, 1) * 1e6)
    cell.requests += n
    cell.errors += errors


def summarize(cells: list[Cell]) -> list[dict[str, object]]:
    base = {c.threads: statistics.median(c.rps) for c in cells if c.client == "httpx"}
    return [
        {"client": c.client, "threads": c.threads, "rps": round(statistics.median(c.rps)),
         "cpu_us_per_request": round(statistics.median(c.cpu_us), 1),
         "x_httpx_rps": round(statistics.median(c.rps) / base[c.threads], 2),
         "requests": c.requests, "errors": c.errors,
         "runs_rps": [round(r) for r in c.rps], "runs_cpu_us": [round(u, 1) for u in c.cpu_us]}
        for c in cells
    ]  # fmt: skip


def print_table(rows: list[dict[str, object]]) -> None:
    print("| client | threads | req/s | CPU us/req | x httpx req/s | errors |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['client']} | {r['threads']} | {r['rps']:,} | {r['cpu_us_per_request']} "
              f"| {r['x_httpx_rps']:.2f} | {r['errors']} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="per measured run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="1 round of 2 s")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    seconds, rounds = (2.0, 1) if args.quick else (args.seconds, args.rounds)

    os.sched_setaffinity(0, {CLIENT_CORE})
    port = free_port()
    upstream = start_uvicorn("_apps:backend", port, UPSTREAM_CORE, {})
    try:
        wait_for_port(port, upstream)
        url, host = f"http://127.0.0.1:{port}/x", f"127.0.0.1:{port}".encode()
        cells = [Cell(client, t) for t in THREADS for client in CLIENTS]
        for round_ in range(rounds):
            for cell in cells:
                run_cell(cell, url, host, seconds)
                print(f"round {round_ + 1}: {cell.client}, {cell.threads} threads: "
                      f"{cell.rps[-1]:,.0f} req/s", file=sys.stderr)  # fmt: skip
    finally:
        stop([upstream])
    rows = summarize(cells)
    if args.json:
        versions = {m.__name__: m.__version__ for m in (httpx, urllib3)}
        print(json.dumps({"seconds": seconds, "rounds": rounds, "versions": versions,
                          "rows": rows}, indent=2))  # fmt: skip
    else:
        print_table(rows)


if __name__ == "__main__":
    main()
