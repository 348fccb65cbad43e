"""Cost of one pick, per algorithm, at N = 10, 100, 1,000 and 10,000 backends.

Each algorithm runs inside a real :class:`balancekit.Balancer` pool, as the
proxy uses it: ``acquire`` (the pick under the pool's lock, plus the
algorithm's feedback hooks) and ``release`` (counters, a latency sample,
outlier bookkeeping). Requests overlap: up to 32 stay in flight, released
oldest first, with latency samples from a seeded generator, so the
load-aware algorithms see changing counters and not an idle pool.

Reported per algorithm and N, in microseconds:

- ``pick``: one acquire + release cycle through the pool, minus the same
  cycle with a do-nothing algorithm (always the first backend) measured in
  the same run: what the algorithm itself costs a request, hooks included;
- ``cycle``: the whole acquire + release cycle, for context;
- ``change``: disabling one backend plus the first pick after it: what a
  failed health check, a drain or an ejection costs, with the tables an
  algorithm derives from the eligible backends (ring, Maglev table,
  schedule, heap) rebuilt once, in ``prepare`` or on that first pick.

Targets (issue 3): ``pick`` <= 2 us at N = 100 and <= 10 us at N = 10,000.
Weights cycle 1..5 for every algorithm; hash keys come from 1,000 distinct
client addresses.

    .venv/bin/python bench/algorithm_bench.py            # about a minute
    .venv/bin/python bench/algorithm_bench.py --quick    # N = 10 and 100 only
    .venv/bin/python bench/algorithm_bench.py --json bench/results/algorithms.json
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from balancekit import Balancer
from balancekit._backend import Backend
from balancekit._pool import Pool
from balancekit._request import RequestInfo
from balancekit.algorithms.base import Algorithm
from balancekit.testing import make_request

SIZES = (10, 100, 1_000, 10_000)
ALGORITHMS: dict[str, dict[str, Any]] = {
    "round_robin": {},
    "random": {},
    "weighted_round_robin": {},
    "weighted_random": {},
    "least_connections": {},
    "least_response_time": {},
    "p2c": {},
    "consistent_hash": {"key": "ip"},
    "consistent_hash (bounded_load)": {"key": "ip", "bounded_load": 1.25},
    "maglev": {"key": "ip"},
    "first": {},
}
TARGETS = {100: 2.0, 10_000: 10.0}
IN_FLIGHT = 32


class _FirstBackend(Algorithm):
    """The baseline: no decision at all."""

    name = "baseline"

    def pick(self, backends: Sequence[Backend], request: RequestInfo) -> Backend:
        return backends[0]


def make_pool(algorithm: str, options: dict[str, Any], size: int) -> Pool:
    name = algorithm.split(" ")[0]
    config = {
        "pools": {
            "bench": {
                "algorithm": {"name": name, **options},
                "backends": [
                    {"url": f"http://10.{i // 250 % 250}.{i % 250}.1:8080", "weight": i % 5 + 1}
                    for i in range(size)
                ],
            }
        },
        "routes": [{"prefix": "/", "pool": "bench"}],
    }
    return Balancer(config).pools["bench"]


def requests() -> list[RequestInfo]:
    return [make_request(client_ip=f"198.51.{i // 250}.{i % 250 + 1}") for i in range(1000)]


def cycle_cost(pool: Pool, reqs: list[RequestInfo], iterations: int) -> float:
    """Microseconds per acquire + release, best of three runs."""
    rng = random.Random(7)
    latencies = [rng.lognormvariate(2.5, 0.6) for _ in range(997)]
    best = float("inf")
    for _ in range(3):
        held: deque[Backend] = deque()
        acquire, release = pool.acquire, pool.release
        nreq, nlat = len(reqs), len(latencies)
        gc.disable()
        start = time.perf_counter()
        done = 0
        # Batches of 500 until ``iterations`` or one second, whichever first:
        # an O(N) algorithm at N = 10,000 must not take minutes.
        while done < iterations and time.perf_counter() - start < 1.0:
            for i in range(done, done + 500):
                held.append(acquire(reqs[i % nreq]))
                if len(held) > IN_FLIGHT:
                    release(held.popleft(), ok=True, latency_ms=latencies[i % nlat])
            done += 500
        elapsed = time.perf_counter() - start
        gc.enable()
        while held:
            release(held.popleft(), ok=True, latency_ms=10.0)
        best = min(best, elapsed / done * 1e6)
    return best


def change_cost(pool: Pool, reqs: list[RequestInfo]) -> float:
    """Microseconds to disable one backend plus the first pick after it.

    A different backend each time, so that no table made for an earlier
    eligible set can be reused: this is what a health check failing, a
    drain or an ejection costs, whether the algorithm derives its tables
    in ``prepare`` (inside ``disable``) or on the first pick.
    """
    best = float("inf")
    count = len(pool.backends)
    for i in range(3):
        url = pool.backends[count * (i + 1) // 4].url
        start = time.perf_counter()
        pool.disable(url)
        backend = pool.acquire(reqs[i])
        elapsed = time.perf_counter() - start
        pool.release(backend, ok=True, latency_ms=10.0)
        pool.enable(url)
        pool.release(pool.acquire(reqs[i]), ok=True, latency_ms=10.0)
        best = min(best, elapsed * 1e6)
    return best


def iterations_for(size: int, quick: bool) -> int:
    return 20_000 if quick else 50_000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="N = 10 and 100 only")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    sizes = SIZES[:2] if args.quick else SIZES
    reqs = requests()

    baseline: dict[int, float] = {}
    for size in sizes:
        pool = make_pool("round_robin", {}, size)
        pool.algorithm = _FirstBackend()
        baseline[size] = cycle_cost(pool, reqs, iterations_for(size, args.quick))

    results: list[dict[str, Any]] = []
    header = f"{'algorithm':<32}" + "".join(f"{'N=' + format(n, ','):>12}" for n in sizes)
    print("pick: us per request the algorithm adds (acquire + release minus baseline)")
    print(header)
    print(f"{'(baseline cycle)':<32}" + "".join(f"{baseline[n]:>12.2f}" for n in sizes))
    failed = []
    for algorithm, options in ALGORITHMS.items():
        row = f"{algorithm:<32}"
        for size in sizes:
            pool = make_pool(algorithm, options, size)
            change = change_cost(pool, reqs)
            cycle = cycle_cost(pool, reqs, iterations_for(size, args.quick))
            pick = max(cycle - baseline[size], 0.0)
            target = TARGETS.get(size)
            verdict = "" if target is None or pick <= target else "!"
            if verdict:
                failed.append(f"{algorithm} at N={size}: {pick:.2f} us > {target} us")
            row += f"{pick:>11.2f}{verdict or ' '}"
            results.append(
                {
                    "algorithm": algorithm,
                    "backends": size,
                    "pick_us": round(pick, 3),
                    "cycle_us": round(cycle, 3),
                    "change_us": round(change, 1),
                    "target_us": target,
                }
            )
        print(row, flush=True)

    print("\nchange: us to disable one backend, plus the first pick after it")
    print(header)
    for algorithm in ALGORITHMS:
        cells = [r["change_us"] for r in results if r["algorithm"] == algorithm]
        print(f"{algorithm:<32}" + "".join(f"{c:>12,.0f}" for c in cells))

    print(f"\nPython {sys.version.split()[0]}; '!' marks a missed target.")
    for line in failed:
        print("missed:", line)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"baseline_us": baseline, "results": results}, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
