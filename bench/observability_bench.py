"""What request ids, the JSON access log and tracing cost per request.

    .venv/bin/python bench/observability_bench.py               # 5 rounds, ~1 min
    .venv/bin/python bench/observability_bench.py --rounds 9 --requests 10000

The in-process harness of ``inprocess_bench.py`` (the ASGI middleware called
directly, the httptools transport, a keep-alive backend in the same
process, no server or load tool between them), once per variant, each in a
process of its own pinned to one core (OpenTelemetry allows one tracer
provider per process), the variants interleaved round by round:

- ``bare``: ``request_id = ""``, no access log, no tracing;
- ``request id``: the default (``X-Request-ID`` made for every request);
- ``json log``: and ``access_log = "json"``, written through a
  ``logging.StreamHandler`` to ``/dev/null`` (so formatting is paid too);
- ``tracing``: and ``tracing = true`` with the OpenTelemetry SDK's
  ``TracerProvider`` and a ``BatchSpanProcessor`` whose exporter drops
  the spans (its thread's CPU is counted).

Reported: CPU microseconds per request (the minimum and the median of the
rounds; one process's run moves by 20% with its memory layout) and what
each adds, by the minimum, over the variant before it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from inprocess_bench import _measure

VARIANTS = {
    "bare": {"request_id": ""},
    "request id": {},
    "json log": {"access_log": "json"},
    "tracing": {"access_log": "json", "tracing": True},
}


def _configure(variant: str) -> None:
    if VARIANTS[variant].get("access_log"):
        access = logging.getLogger("balancekit.access")
        access.addHandler(logging.StreamHandler(open(os.devnull, "w")))  # noqa: SIM115
        access.setLevel(logging.INFO)
        access.propagate = False
    if VARIANTS[variant].get("tracing"):
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import (
            BatchSpanProcessor,
            SpanExporter,
            SpanExportResult,
        )

        class Drop(SpanExporter):
            def export(self, spans: Any) -> SpanExportResult:
                return SpanExportResult.SUCCESS

        provider = TracerProvider()
        provider.add_span_processor(BatchSpanProcessor(Drop()))
        trace.set_tracer_provider(provider)


def _run_once(variant: str, requests: int) -> float:
    command = [sys.executable, __file__, "--child", variant, "--requests", str(requests)]
    if os.path.exists("/usr/bin/taskset"):
        command = ["taskset", "-c", "1", *command]
    # glibc's mmap threshold moves with a process's history and can cost an
    # mmap per read in one variant and not another: pinned, as
    # inprocess_bench.py --pin-malloc does.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=True, env=env)
    return float(done.stdout.strip())


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=5000, help="per run (default 5000)")
    parser.add_argument("--child", choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _configure(args.child)
        settings = {"status": {"enabled": False}, **VARIANTS[args.child]}
        print(asyncio.run(_measure(args.requests, settings)))
        return
    samples: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(args.rounds):
        for name in VARIANTS:
            samples[name].append(_run_once(name, args.requests))
    print(f"\nCPU us per request over {args.rounds} rounds of {args.requests} requests")
    print(f"{'variant':<12} {'min':>8} {'median':>8} {'adds (min)':>11}")
    previous = None
    for name, values in samples.items():
        low, median = min(values), statistics.median(values)
        adds = "" if previous is None else f"{low - previous:+11.1f}"
        print(f"{name:<12} {low:>8.1f} {median:>8.1f} {adds:>11}")
        previous = low


if __name__ == "__main__":
    main()
