"""Regenerate docs/choosing-an-algorithm.md and its plots from the simulator.

    .venv/bin/python bench/algorithm_guide.py

Runs every built-in algorithm on every built-in scenario (100,000 requests,
seed 1), writes one PNG per scenario to docs/img/ and the guide's tables
between its GENERATED markers; the prose around them is kept as it is.
"""

from __future__ import annotations

import time
from pathlib import Path

from balancekit._plugins import make_plugin_manager
from balancekit.simulate import SCENARIOS, plot, recommend, run

ROOT = Path(__file__).resolve().parent.parent
GUIDE = ROOT / "docs" / "choosing-an-algorithm.md"
IMAGES = ROOT / "docs" / "img"
BEGIN, END = "<!-- GENERATED: begin -->", "<!-- GENERATED: end -->"
REQUESTS = 100_000
#: The seed's four first, then the rest in the contract's order.
ORDER = [
    "round_robin",
    "random",
    "weighted_round_robin",
    "least_response_time",
    "weighted_random",
    "least_connections",
    "p2c",
    "consistent_hash",
    "maglev",
    "first",
]


def section(name: str, report: dict, seconds: float) -> str:
    scenario = SCENARIOS[name]
    results = report["algorithms"]
    lines = [
        f"### `{name}`: {scenario.description}",
        "",
        f"Load {scenario.load:.0%} of the fleet's capacity; {REQUESTS:,} requests "
        f"({seconds:.1f} s for all ten).",
        "",
        "| algorithm | p50 ms | p95 ms | p99 ms | errors | max share / mean |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for algorithm in ORDER:
        r = results[algorithm]
        lines.append(
            f"| `{algorithm}` | {r['p50_ms']:,.1f} | {r['p95_ms']:,.1f} | {r['p99_ms']:,.1f} "
            f"| {r['error_rate']:.2%} | {r['max_share_ratio']:.2f} |"
        )
    lines += ["", f"{recommend(report).capitalize()}.", "", f"![{name}](img/simulate-{name}.png)"]
    return "\n".join(lines)


def main() -> None:
    classes = make_plugin_manager(entry_points=False).classes("algorithm")
    algorithms = {name: classes[name][0] for name in ORDER}
    IMAGES.mkdir(exist_ok=True)
    sections = []
    for name in SCENARIOS:
        started = time.perf_counter()
        report = run(SCENARIOS[name], algorithms, requests=REQUESTS, seed=1)
        seconds = time.perf_counter() - started
        plot(report, IMAGES / f"simulate-{name}.png")
        sections.append(section(name, report, seconds))
        print(f"{name}: {seconds:.1f} s")
    text = GUIDE.read_text()
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    GUIDE.write_text(f"{head}{BEGIN}\n\n" + "\n\n".join(sections) + f"\n\n{END}{tail}")
    print(f"wrote {GUIDE.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
