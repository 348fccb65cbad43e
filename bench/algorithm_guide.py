"""Regenerate docs/choosing-an-algorithm.md and its plots from the simulator.

    .venv/bin/python bench/algorithm_guide.py

Runs every built-in algorithm on every built-in scenario (100,000 requests,
seed 1), then the algorithms that keep state per balancer on some of them
again with 4 balancers sharing the backends; writes one PNG per scenario
to docs/img/ and the guide's tables between its GENERATED markers; the
prose around them is kept as it is.
"""

from __future__ import annotations

import textwrap
import time
from pathlib import Path

from balancekit._plugins import make_plugin_manager
from balancekit.simulate import SCENARIOS, Scenario, plot, recommend, run

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
#: The several-balancers table: what a lone balancer's counts and averages
#: are worth when it sees a quarter of the traffic.
BALANCERS = 4
SHARED_SCENARIOS = ["uniform", "slow-backend", "gray-failure", "bursty"]
SHARED_ALGORITHMS = ["round_robin", "least_connections", "least_response_time", "p2c"]


def offered(scenario: Scenario) -> str:
    if not scenario.phases:
        return f"Load {scenario.load:.0%} of the fleet's capacity"
    phases = ", ".join(f"{share:.0%} for {seconds:g} s" for seconds, share in scenario.phases)
    return f"Load {phases}, in turn ({scenario.load:.0%} on average)"


def section(name: str, report: dict, seconds: float) -> str:
    scenario = SCENARIOS[name]
    results = report["algorithms"]
    lines = [
        f"### `{name}`: {scenario.description}",
        "",
        f"{offered(scenario)}; {REQUESTS:,} requests ({seconds:.1f} s of CPU for all ten).",
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


def shared(alone: dict[str, dict], algorithms: dict) -> str:
    """The table of one balancer against ``BALANCERS``, per scenario and algorithm."""
    chosen = {name: algorithms[name] for name in SHARED_ALGORITHMS}
    several = {
        name: run(SCENARIOS[name], chosen, requests=REQUESTS, seed=1, balancers=BALANCERS)
        for name in SHARED_SCENARIOS
    }
    one = alone["slow-backend"]["algorithms"]["least_connections"]["p99_ms"]
    many = several["slow-backend"]["algorithms"]["least_connections"]["p99_ms"]
    model = (
        f"The same scenarios with `balancers = {BALANCERS}`: {BALANCERS} independent "
        "balancers (processes or hosts) in front of the same five backends, each arrival "
        "sent to one of them at random. Each balancer has its own algorithm and knows only "
        "its own requests: its in-flight counts and its latency averages; the backends' "
        "queues are shared. The arrivals and service times are the same in both columns, "
        "so they differ by the balancing only."
    )
    finding = (
        "An algorithm that counts requests in flight now sees a quarter of them: "
        f"`least_connections`' p99 in `slow-backend` goes from {one:,.1f} ms to "
        f"{many:,.1f} ms. A latency average still measures the whole load, since a "
        "backend's answers are slow whoever queued in front of them, so `p2c` and "
        "`least_response_time` keep their tails. p50 / p99 in ms, "
        f"{REQUESTS:,} requests, seed 1."
    )
    lines = [
        f"### {BALANCERS} balancers sharing the backends",
        "",
        textwrap.fill(model, 75),
        "",
        textwrap.fill(finding, 75),
        "",
        f"| scenario | algorithm | 1 balancer | {BALANCERS} balancers |",
        "| --- | --- | ---: | ---: |",
    ]
    for name in SHARED_SCENARIOS:
        for algorithm in SHARED_ALGORITHMS:
            a, b = alone[name]["algorithms"][algorithm], several[name]["algorithms"][algorithm]
            lines.append(
                f"| `{name}` | `{algorithm}` | {a['p50_ms']:,.1f} / {a['p99_ms']:,.1f} "
                f"| {b['p50_ms']:,.1f} / {b['p99_ms']:,.1f} |"
            )
    return "\n".join(lines)


def main() -> None:
    classes = make_plugin_manager(entry_points=False).classes("algorithm")
    algorithms = {name: classes[name][0] for name in ORDER}
    IMAGES.mkdir(exist_ok=True)
    sections = []
    reports = {}
    for name in SCENARIOS:
        started = time.process_time()
        reports[name] = report = run(SCENARIOS[name], algorithms, requests=REQUESTS, seed=1)
        seconds = time.process_time() - started
        plot(report, IMAGES / f"simulate-{name}.png")
        sections.append(section(name, report, seconds))
        print(f"{name}: {seconds:.1f} s")
    sections.append(shared(reports, algorithms))
    text = GUIDE.read_text()
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    GUIDE.write_text(f"{head}{BEGIN}\n\n" + "\n\n".join(sections) + f"\n\n{END}{tail}")
    print(f"wrote {GUIDE.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
