"""Regenerate docs/choosing-an-algorithm.md and its plots from the simulator.

    .venv/bin/python bench/algorithm_guide.py

Runs every built-in algorithm on every built-in scenario (100,000 requests,
seed 1), then the algorithms that keep state per balancer on some of them
again with 4 balancers sharing the backends, then section 16's pool
settings (hedge, adaptive_concurrency) against none; writes one PNG per
scenario to docs/img/ and the guide's tables between its GENERATED
markers; the prose around them is kept as it is.
"""

from __future__ import annotations

import textwrap
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from balancekit._plugins import make_plugin_manager
from balancekit.simulate import SCENARIOS, Scenario, plot, recommend, run, simulate

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
    "prequal",
    "consistent_hash",
    "maglev",
    "first",
]
#: The several-balancers table: what a lone balancer's counts and averages
#: are worth when it sees a quarter of the traffic.
BALANCERS = 4
SHARED_SCENARIOS = ["uniform", "slow-backend", "gray-failure", "bursty"]
SHARED_ALGORITHMS = ["round_robin", "least_connections", "least_response_time", "p2c", "prequal"]
#: Section 16's pool settings, each against none.
HEDGES = [0.03, 0.05]
HEDGE_SCENARIOS = ["slow-backend", "gray-failure"]
HEDGE_ALGORITHMS = ["round_robin", "least_connections", "p2c"]
ADAPTIVE = {"min_limit": 4, "max_limit": 1000, "window": 1.0}


def offered(scenario: Scenario) -> str:
    if not scenario.phases:
        return f"Load {scenario.load:.0%} of the fleet's capacity"
    phases = ", ".join(f"{share:.0%} for {seconds:g} s" for seconds, share in scenario.phases)
    return f"Load {phases}, in turn ({scenario.load:.0%} on average)"


def section(name: str, report: dict[str, Any], seconds: float) -> str:
    scenario = SCENARIOS[name]
    results = report["algorithms"]
    lines = [
        f"### `{name}`: {scenario.description}",
        "",
        f"{offered(scenario)}; {REQUESTS:,} requests "
        f"({seconds:.1f} s of CPU for all {len(ORDER)}).",
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


def shared(alone: dict[str, dict[str, Any]], algorithms: dict[str, type[Any]]) -> str:
    """The table of one balancer against ``BALANCERS``, per scenario and algorithm."""
    chosen = {name: algorithms[name] for name in SHARED_ALGORITHMS if name in algorithms}
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
        for algorithm in chosen:
            a, b = alone[name]["algorithms"][algorithm], several[name]["algorithms"][algorithm]
            lines.append(
                f"| `{name}` | `{algorithm}` | {a['p50_ms']:,.1f} / {a['p99_ms']:,.1f} "
                f"| {b['p50_ms']:,.1f} / {b['p99_ms']:,.1f} |"
            )
    return "\n".join(lines)


def adaptive(alone: dict[str, dict[str, Any]], algorithms: dict[str, type[Any]]) -> str:
    """Section 16 in numbers, and when each part helps or hurts, in plain words."""
    hedged: dict[tuple[str, str, float], dict[str, Any]] = {}
    for name in HEDGE_SCENARIOS:
        for algorithm in HEDGE_ALGORITHMS:
            for after in HEDGES:
                model = replace(SCENARIOS[name], hedge={"after": after, "max": 1})
                hedged[name, algorithm, after] = simulate(
                    model, algorithms[algorithm], requests=REQUESTS, seed=1
                ).as_dict()
    bursty = SCENARIOS["bursty"]
    limited = {
        label: simulate(
            replace(bursty, adaptive_concurrency=ADAPTIVE, max_pending=pending, queue_timeout=2.0),
            algorithms["p2c"],
            requests=REQUESTS,
            seed=1,
        ).as_dict()
        for label, pending in (("503 over it", 0), ("queue 200, 2 s", 200))
    }
    plain = alone["bursty"]["algorithms"]["p2c"]
    lc = alone["slow-backend"]["algorithms"]["least_connections"]
    lc_hedged = hedged["slow-backend", "least_connections", 0.05]
    p2c = alone["slow-backend"]["algorithms"]["p2c"]
    p2c_hedged = hedged["slow-backend", "p2c", 0.05]
    shed = limited["503 over it"]
    lines = [
        "### When Prequal, hedging and adaptive concurrency help, and when they hurt",
        "",
        textwrap.fill(
            "The pool settings of [adaptive.md](adaptive.md) run in the simulator through the "
            "real pool. A hedge starts after `after` seconds without an answer (the simulator "
            "has no separate response head: the first try to end wins) on another backend "
            "picked by the same algorithm, within the retry budget; the loser is cancelled "
            "and frees its slot at once.",
            75,
        ),
        "",
        textwrap.fill(
            f"**Hedging helps an algorithm that still sends a slow backend its share**: "
            f"`least_connections`' p99 in `slow-backend` goes from {lc['p99_ms']:,.1f} ms to "
            f"{lc_hedged['p99_ms']:,.1f} ms with `after = 0.05` at "
            f"{lc_hedged['hedge_share']:.1%} extra requests; `round_robin`'s collapse ends, at "
            f"the price of hedging everything its slow backend gets. **It hurts a latency-aware "
            f"algorithm** that already avoids the slow backend: a cancelled loser tells only "
            f"that the backend took longer than the winner (its time so far feeds the average "
            f"as a lower bound), so the slow backend looks faster than it is and gets more traffic "
            f"(`p2c` sends it {p2c_hedged['share']['b5']:.1%} of tries instead of "
            f"{p2c['share']['b5']:.1%}), and `p2c`'s p99 goes from {p2c['p99_ms']:,.1f} ms to "
            f"{p2c_hedged['p99_ms']:,.1f} ms. Set `after` near the p95 of what the pool "
            "answers; below it the extra load grows fast.",
            75,
        ),
        "",
        "| scenario | algorithm | p99 ms, no hedge | after | p99 ms | extra requests "
        "| hedge answered first |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in HEDGE_SCENARIOS:
        for algorithm in HEDGE_ALGORITHMS:
            base = alone[name]["algorithms"][algorithm]["p99_ms"]
            for after in HEDGES:
                r = hedged[name, algorithm, after]
                lines.append(
                    f"| `{name}` | `{algorithm}` | {base:,.1f} | {after:g} s | {r['p99_ms']:,.1f} "
                    f"| {r['hedge_share']:.1%} | {r['hedge_wins']:.0%} |"
                )
    lines += [
        "",
        textwrap.fill(
            f"**Adaptive concurrency helps under overload**: in `bursty` with `p2c`, the limit "
            f"(window 1 s) turns the 110 % seconds' queueing into 503s: p99 "
            f"{plain['p99_ms']:,.1f} ms without it, {shed['p99_ms']:,.1f} ms with it, for "
            f"{shed['error_rate']:.1%} of requests refused. **It hurts** where nothing is "
            "overloaded (every 60 windows it measures the minimum latency at `min_limit`, and "
            "what is above that waits or is refused), and with a queue its waits are in the "
            "latency. A backend that holds requests for ever (round robin's slow one) fills "
            "a pool-wide limit on its own and starves the healthy ones.",
            75,
        ),
        "",
        "| `bursty`, `p2c` | p50 ms | p99 ms | errors (503) | limit, min to max |",
        "| --- | ---: | ---: | ---: | ---: |",
        f"| no limit | {plain['p50_ms']:,.1f} | {plain['p99_ms']:,.1f} "
        f"| {plain['error_rate']:.1%} | - |",
    ]
    for label, r in limited.items():
        limit = r["concurrency_limit"]
        lines.append(
            f"| limit, {label} | {r['p50_ms']:,.1f} | {r['p99_ms']:,.1f} | {r['error_rate']:.1%} "
            f"| {limit['min']} to {limit['max']} |"
        )
    if "prequal" in algorithms:
        lines += ["", textwrap.fill(prequal_finding(alone), 75)]
    return "\n".join(lines)


def prequal_finding(alone: dict[str, dict[str, Any]]) -> str:
    gray = alone["gray-failure"]["algorithms"]
    return (
        "**Prequal** reads each backend's own report of its load, so unlike "
        "`least_connections` it sees what the other balancers send (the 4-balancer table "
        "above). On these five-backend scenarios it does not beat `p2c`: in `gray-failure` "
        f"its p50 / p99 are {gray['prequal']['p50_ms']:,.1f} / {gray['prequal']['p99_ms']:,.1f} "
        f"ms against `p2c`'s {gray['p2c']['p50_ms']:,.1f} / {gray['p2c']['p99_ms']:,.1f}. With "
        "every backend in its probe pool, the cold backend with the lowest reported latency "
        "takes request after request, and a backend that went idle keeps reporting the "
        "latency of its last busy spell. The simulator answers probes instantly; real "
        "probes are older still. [prequal.md](prequal.md) says where it is meant to help: "
        "many balancers over many backends."
    )


def main() -> None:
    classes = make_plugin_manager(entry_points=False).classes("algorithm")
    ORDER[:] = [name for name in ORDER if name in classes]
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
    sections.append(adaptive(reports, algorithms))
    text = GUIDE.read_text()
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    GUIDE.write_text(f"{head}{BEGIN}\n\n" + "\n\n".join(sections) + f"\n\n{END}{tail}")
    print(f"wrote {GUIDE.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
