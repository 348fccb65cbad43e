"""What ``prequal`` costs a request, beside ``p2c``: the pick, and its probes.

1. **The pick**, in a real pool (as ``algorithm_bench.py``: acquire +
   release cycles, up to 32 requests in flight, seeded latency samples),
   minus the same cycle with a do-nothing algorithm, at N = 3, 16, 100 and
   1,000 backends:

   - ``p2c``: for comparison;
   - ``prequal`` with every probe answered at once (its ``send_probe``
     calls ``record_probe`` with seeded numbers): the steady state of the
     pick, the 3 probes per request it schedules, the answers it drains
     into the pool and the threshold it re-sorts, all without the network;
   - the same at ``probe_rate = 1``;
   - ``prequal`` with no answers at all (``probe_rate = 0``): the fall-back
     pick over local counts, which is ``p2c``'s plus a look at the empty pool.

2. **A probe**, for real: the balancer-side CPU time of one probe (a task,
   a TCP connection to a LoadReportMiddleware backend running uvicorn in a
   subprocess, the GET, the JSON), 8 at a time on one event loop, divided
   by the probes made. At the default ``probe_rate = 3`` a request costs
   three of these on top of its pick.

    .venv/bin/python bench/prequal_bench.py            # ~30 s
    .venv/bin/python bench/prequal_bench.py --quick    # fewer rounds
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import random
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

from balancekit import Balancer
from balancekit._backend import Backend
from balancekit._pool import Pool
from balancekit._request import RequestInfo
from balancekit.algorithms import PowerOfTwoChoices
from balancekit.algorithms.base import Algorithm
from balancekit.algorithms.prequal import Prequal

SIZES = (3, 16, 100, 1000)
IN_FLIGHT = 32
REQUEST = RequestInfo("GET", "/")
BACKEND = """
import asyncio, sys, uvicorn
from balancekit.load_report import LoadReportMiddleware

async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})

uvicorn.run(LoadReportMiddleware(app), host="127.0.0.1", port=int(sys.argv[1]),
            log_level="warning", lifespan="off")
"""


class _FirstBackend(Algorithm):
    name = "baseline"

    def pick(self, backends: Sequence[Backend], request: RequestInfo) -> Backend:
        return backends[0]


class _Answered(Prequal):
    """Every probe answered as soon as it is sent, with seeded numbers."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        rng = random.Random(3)
        self._numbers = [(rng.randint(0, 4), rng.uniform(5, 50)) for _ in range(1009)]
        self._next = 0

    def send_probe(self, backend: Backend) -> None:
        extra, latency = self._numbers[self._next % 1009]
        self._next += 1
        self.record_probe(backend, backend.active_requests + extra, latency)


def make_pool(size: int) -> Pool:
    config = {
        "pools": {
            "bench": {
                "backends": [f"http://10.{i // 250}.{i % 250}.1:8080" for i in range(size)],
            }
        },
        "routes": [{"prefix": "/", "pool": "bench"}],
    }
    return Balancer(config).pools["bench"]


def cycle_cost(pool: Pool, iterations: int) -> float:
    """Microseconds per acquire + release, best of five runs."""
    rng = random.Random(7)
    latencies = [rng.lognormvariate(2.5, 0.6) for _ in range(997)]
    best = float("inf")
    for _ in range(5):
        held: deque[Backend] = deque()
        acquire, release = pool.acquire, pool.release
        gc.disable()
        start = time.perf_counter()
        for i in range(iterations):
            held.append(acquire(REQUEST))
            if len(held) > IN_FLIGHT:
                release(held.popleft(), ok=True, latency_ms=latencies[i % 997])
        elapsed = time.perf_counter() - start
        gc.enable()
        while held:
            release(held.popleft(), ok=True, latency_ms=10.0)
        best = min(best, elapsed / iterations * 1e6)
    return best


def picks(iterations: int) -> None:
    print("pick: us per request the algorithm adds (acquire + release minus baseline)")
    header = f"{'algorithm':<34}" + "".join(f"{'N=' + format(n, ','):>10}" for n in SIZES)
    print(header)
    rows: dict[str, list[float]] = {}
    variants: dict[str, Any] = {
        "p2c": PowerOfTwoChoices,
        "prequal (probes answered at once)": _Answered,
        "prequal, probe_rate 1 (answered)": lambda: _Answered(probe_rate=1),
        "prequal (no answers: fall-back)": lambda: Prequal(probe_rate=0),
    }
    for size in SIZES:
        pool = make_pool(size)
        pool.algorithm = _FirstBackend()
        baseline = cycle_cost(pool, iterations)
        for label, build in variants.items():
            pool = make_pool(size)
            pool.algorithm = build()
            rows.setdefault(label, []).append(max(cycle_cost(pool, iterations) - baseline, 0.0))
    for label, cells in rows.items():
        print(f"{label:<34}" + "".join(f"{c:>10.2f}" for c in cells))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def probe_cost(url: str, probes: int) -> tuple[float, float, int]:
    """(CPU us per probe, wall us per probe, failures) for ``probes`` real probes."""
    algorithm = Prequal(probe_rate=0)
    backend = Backend(url)
    failures = 0

    async def one() -> None:
        nonlocal failures
        await algorithm._probe(backend)
        while algorithm._inbox:
            failures += bool(algorithm._inbox.popleft()[4])

    for _ in range(50):  # warm up
        await one()
    failures = 0
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(probes // 8):
        await asyncio.gather(*(one() for _ in range(8)))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    made = probes // 8 * 8
    return cpu / made * 1e6, wall / made * 1e6, failures


def probes(count: int) -> None:
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-c", BACKEND, str(port)],
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        cpu, wall, failures = asyncio.run(probe_cost(f"http://127.0.0.1:{port}", count))
    finally:
        server.terminate()
        server.wait(10)
    print(
        f"\nprobe: {cpu:.0f} us CPU in the balancer per probe ({wall:.0f} us wall, 8 at a time,"
        f" {count} probes, {failures} failed); x 3 per request at probe_rate = 3"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    picks(10_000 if args.quick else 40_000)
    probes(800 if args.quick else 4000)


if __name__ == "__main__":
    main()
