"""Issue 23's simulator measures: section 16 in ``balancekit simulate``.

1. p50 / p99 of ``prequal`` (when registered), ``p2c``,
   ``least_connections`` and ``round_robin`` in ``slow-backend``,
   ``gray-failure`` and ``bursty``, with 1 and 4 balancers;
2. ``hedge = { after, max = 1 }`` against no hedging in ``slow-backend``
   (and ``gray-failure``): p99, the extra requests (hedges per request)
   and how often the hedge answered first;
3. ``adaptive_concurrency`` in ``bursty``: p50 / p99, the requests shed
   (503s), and how far the limit moved, without a queue and with
   section 11's (``max_pending = 200``, ``queue_timeout = 2``).

100,000 requests per run, seeds 1 to 3 by default; the runs are spread
over ``--jobs`` processes. Prints Markdown tables and writes
bench/results/adaptive_sim.json.

    .venv/bin/python bench/adaptive_sim.py [--requests 100000] [--seeds 1,2,3] [--jobs 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

from balancekit._plugins import make_plugin_manager
from balancekit.simulate import SCENARIOS, simulate

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "adaptive_sim.json"
ALGORITHMS = ["prequal", "p2c", "least_connections", "round_robin"]
SCENARIO_NAMES = ["slow-backend", "gray-failure", "bursty"]
HEDGE_AFTER = [0.02, 0.03, 0.05, 0.1]
HEDGE_SCENARIOS = ["slow-backend", "gray-failure"]
HEDGE_ALGORITHMS = ["p2c", "least_connections", "round_robin"]
ADAPTIVE = {"min_limit": 4, "max_limit": 1000, "window": 1.0}
#: (label, adaptive_concurrency, max_pending)
ADAPTIVE_VARIANTS = [
    ("off", None, 0),
    ("limit, 503 over it", ADAPTIVE, 0),
    ("limit + queue 200 / 2 s", ADAPTIVE, 200),
]


def one(job: Mapping[str, Any]) -> dict[str, Any]:
    """One simulation: the job's settings and its result as a dict."""
    classes = make_plugin_manager(entry_points=False).classes("algorithm")
    scenario = replace(
        SCENARIOS[job["scenario"]],
        hedge=job.get("hedge"),
        adaptive_concurrency=job.get("adaptive"),
        max_pending=job.get("max_pending", 0),
        queue_timeout=2.0,
    )
    result = simulate(
        scenario,
        classes[job["algorithm"]][0],
        requests=job["requests"],
        seed=job["seed"],
        balancers=job["balancers"],
    )
    return {**job, **result.as_dict()}


def jobs(algorithms: Sequence[str], requests: int, seeds: Sequence[int]) -> list[dict[str, Any]]:
    todo: list[dict[str, Any]] = []
    base = {"requests": requests}
    for seed in seeds:
        for name in SCENARIO_NAMES:
            for algorithm in algorithms:
                for balancers in (1, 4):
                    todo.append(
                        {
                            **base,
                            "part": "algorithms",
                            "scenario": name,
                            "algorithm": algorithm,
                            "balancers": balancers,
                            "seed": seed,
                        }
                    )
        for name in HEDGE_SCENARIOS:
            for algorithm in HEDGE_ALGORITHMS:
                for after in HEDGE_AFTER:
                    todo.append(
                        {
                            **base,
                            "part": "hedge",
                            "scenario": name,
                            "algorithm": algorithm,
                            "balancers": 1,
                            "seed": seed,
                            "hedge": {"after": after, "max": 1},
                        }
                    )
        for algorithm in ("p2c", "round_robin"):
            for label, adaptive, pending in ADAPTIVE_VARIANTS:
                todo.append(
                    {
                        **base,
                        "part": "adaptive",
                        "scenario": "bursty",
                        "algorithm": algorithm,
                        "balancers": 1,
                        "seed": seed,
                        "label": label,
                        "adaptive": adaptive,
                        "max_pending": pending,
                    }
                )
    return todo


def pick(rows: list[dict[str, Any]], **match: Any) -> list[dict[str, Any]]:
    return sorted(
        (r for r in rows if all(r.get(k) == v for k, v in match.items())), key=lambda r: r["seed"]
    )


def ms(rows: list[dict[str, Any]], key: str) -> str:
    values = [r[key] for r in rows]
    each = " / ".join(f"{v:,.1f}" for v in values)
    return f"{statistics.median(values):,.1f} ({each})"


def algorithms_table(rows: list[dict[str, Any]], algorithms: Sequence[str]) -> list[str]:
    lines = [
        "| scenario | algorithm | balancers | p50 ms | p99 ms |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for name in SCENARIO_NAMES:
        for algorithm in algorithms:
            for balancers in (1, 4):
                got = pick(
                    rows, part="algorithms", scenario=name, algorithm=algorithm, balancers=balancers
                )
                lines.append(
                    f"| `{name}` | `{algorithm}` | {balancers} | {ms(got, 'p50_ms')} "
                    f"| {ms(got, 'p99_ms')} |"
                )
    return lines


def hedge_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| scenario | algorithm | after s | p99 ms without | p99 ms with | ratio "
        "| extra requests | hedge wins |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in HEDGE_SCENARIOS:
        for algorithm in HEDGE_ALGORITHMS:
            plain = pick(rows, part="algorithms", scenario=name, algorithm=algorithm, balancers=1)
            for after in HEDGE_AFTER:
                got = [
                    r
                    for r in pick(rows, part="hedge", scenario=name, algorithm=algorithm)
                    if r["hedge"]["after"] == after
                ]
                ratios = [h["p99_ms"] / p["p99_ms"] for h, p in zip(got, plain, strict=True)]
                extra = " / ".join(f"{r['hedge_share']:.1%}" for r in got)
                wins = " / ".join(f"{r['hedge_wins']:.0%}" for r in got)
                each = " / ".join(f"{x:.2f}" for x in ratios)
                lines.append(
                    f"| `{name}` | `{algorithm}` | {after:g} | {ms(plain, 'p99_ms')} "
                    f"| {ms(got, 'p99_ms')} | {statistics.median(ratios):.2f} ({each}) "
                    f"| {extra} | {wins} |"
                )
    return lines


def adaptive_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| algorithm | adaptive_concurrency | p50 ms | p99 ms | errors (503) | limit min-max |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for algorithm in ("p2c", "round_robin"):
        for label, _, _ in ADAPTIVE_VARIANTS:
            got = pick(rows, part="adaptive", algorithm=algorithm, label=label)
            errors = " / ".join(f"{r['error_rate']:.1%}" for r in got)
            limits = " / ".join(
                f"{r['concurrency_limit']['min']}-{r['concurrency_limit']['max']}"
                for r in got
                if "concurrency_limit" in r
            )
            lines.append(
                f"| `{algorithm}` | {label} | {ms(got, 'p50_ms')} | {ms(got, 'p99_ms')} "
                f"| {errors} | {limits or '-'} |"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    registered = make_plugin_manager(entry_points=False).classes("algorithm")
    algorithms = [a for a in ALGORITHMS if a in registered]
    missing = sorted(set(ALGORITHMS) - set(algorithms))
    todo = jobs(algorithms, args.requests, seeds)
    with ProcessPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(one, todo))
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(rows, indent=1) + "\n")
    print(
        f"{args.requests:,} requests a run; each cell: the median over seeds "
        f"{', '.join(map(str, seeds))} (then each seed's value)"
    )
    if missing:
        print(f"not registered, left out: {', '.join(missing)}")
    for title, lines in (
        ("algorithms, 1 and 4 balancers", algorithms_table(rows, algorithms)),
        ("hedge = { after, max = 1 }, 1 balancer", hedge_table(rows)),
        ("adaptive_concurrency in bursty, window 1 s, 1 balancer", adaptive_table(rows)),
    ):
        print(f"\n### {title}\n")
        print("\n".join(lines))
    print(f"\nwrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
