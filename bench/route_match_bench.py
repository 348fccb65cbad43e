"""Route matching: what a lookup costs now, beside the prefix-only table
that came before host, method and header routing.

    .venv/bin/python bench/route_match_bench.py            # 7 rounds, ~20 s
    .venv/bin/python bench/route_match_bench.py --rounds 3 --reference <git rev>

The reference is ``balancekit/_routing.py`` as it was at ``--reference``
(default: the commit before routing grew conditions), read with ``git show``
and loaded beside today's module, so both run in the same process on the
same paths, interleaved round by round. Reported: CPU nanoseconds per
lookup (``time.process_time``), the median of the rounds, and the ratio to
the reference. The issue's promise: a prefix-only configuration costs no
more than before. The host rows have no reference (it could not route by
host); they show what a Host adds.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from balancekit import _routing, load_config  # noqa: E402

#: The last commit whose routes matched a prefix only.
REFERENCE = "d7bb798"
LOOKUPS = 200_000


def reference_module(rev: str) -> Any:
    source = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{rev}:balancekit/_routing.py"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    module = types.ModuleType("balancekit._routing_reference")
    module.__package__ = "balancekit"
    sys.modules[module.__name__] = module  # dataclasses look their module up
    exec(compile(source, f"{rev}:balancekit/_routing.py", "exec"), module.__dict__)
    return module


def prefix_routes(count: int) -> list[dict[str, Any]]:
    return [{"prefix": f"/svc{i}/", "pool": "p"} for i in range(count)]


def paths(count: int) -> list[str]:
    """Requests spread over the routes, a few levels deep, one in five unrouted."""
    out = []
    for i in range(500):
        if i % 5 == 4:
            out.append(f"/static/app/{i}.js")
        else:
            out.append(f"/svc{i % count}/v1/items/{i}")
    return out


def current_table(routes: list[dict[str, Any]]) -> _routing.RouteTable:
    config = load_config({"pools": {"p": {"backends": ["http://127.0.0.1:9"]}}, "routes": routes})
    return _routing.RouteTable(_routing.route_from_config(r, config.pools) for r in config.routes)


def reference_table(module: Any, routes: list[dict[str, Any]]) -> Any:
    return module.RouteTable(module.Route(r["prefix"], r["pool"]) for r in routes)


def per_lookup(lookup: Callable[[str], object], work: list[str]) -> float:
    """CPU nanoseconds per call of ``lookup`` over ``work``, LOOKUPS calls."""
    repeat = LOOKUPS // len(work)
    started = time.process_time()
    for _ in range(repeat):
        for path in work:
            lookup(path)
    return (time.process_time() - started) * 1e9 / (repeat * len(work))


def host_case(count: int) -> tuple[Callable[[str], object], str]:
    """``count`` routes, half of them under ten exact hosts and a wildcard."""
    routes = prefix_routes(count // 2)
    for i in range(count - count // 2):
        host = f"h{i % 10}.example.com" if i % 3 else "*.example.com"
        routes.append({"prefix": f"/svc{i}/", "pool": "p", "host": host})
    table = current_table(routes)
    headers = [(b"host", b"h3.example.com:8080"), (b"user-agent", b"bench")]

    def lookup(path: str) -> object:
        return table.match(path, "GET", headers)

    return lookup, "with a Host (10 hosts + wildcard)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--reference", default=REFERENCE, help="git revision to compare with")
    args = parser.parse_args()
    reference = reference_module(args.reference)

    rows: list[tuple[str, int, list[float], list[float] | None]] = []
    for count in (1, 10, 100):
        routes = prefix_routes(count)
        work = paths(count)
        now, before = current_table(routes), reference_table(reference, routes)
        for path in work:  # the two must agree before they are timed
            a, b = now.match(path), before.match(path)
            assert (a and a.prefix) == (b and b.prefix), path
        samples_now: list[float] = []
        samples_before: list[float] = []
        for _ in range(args.rounds):
            samples_before.append(per_lookup(before.match, work))
            samples_now.append(per_lookup(now.match, work))
        rows.append(("prefix only", count, samples_now, samples_before))
        host_lookup, label = host_case(count)
        rows.append(
            (label, count, [per_lookup(host_lookup, work) for _ in range(args.rounds)], None)
        )

    print(
        f"\nroute lookups, CPU ns per lookup (median of {args.rounds} rounds), "
        f"reference = {args.reference}"
    )
    print(f"{'configuration':<36} {'routes':>6} {'now':>8} {'before':>8} {'ratio':>7}")
    for label, count, now_ns, before_ns in rows:
        median_now = statistics.median(now_ns)
        if before_ns is None:
            print(f"{label:<36} {count:>6} {median_now:>8.0f} {'-':>8} {'-':>7}")
        else:
            median_before = statistics.median(before_ns)
            ratio = median_now / median_before
            print(f"{label:<36} {count:>6} {median_now:>8.0f} {median_before:>8.0f} {ratio:>6.2f}x")


if __name__ == "__main__":
    main()
