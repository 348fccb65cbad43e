"""CPU per proxied request, in one process, with no server and no load tool.

The ASGI middleware (``transport = "httptools"``, status on) is called
directly, with a fake ``receive``/``send``, for GETs to a keep-alive backend
served by asyncio streams in the same process. No uvicorn, wrk or kernel
scheduling across processes sits between the two measurements, so a change
of a few microseconds on balancekit's own path shows: this is the A/B to
run after a refactor, beside ``proxy_bench.py --baseline``.

With ``--baseline DIR`` each measurement runs once with the working tree's
package and once with DIR's (another checkout, e.g. a ``git worktree``), in
alternating subprocesses pinned to one core; the report gives each side's
minimum and median over ``--pairs`` runs.

glibc's dynamic mmap threshold decides whether a large read buffer costs an
mmap/munmap pair, and it depends on the process's history, so two builds
can differ by that alone: ``--pin-malloc`` sets ``MALLOC_MMAP_THRESHOLD_``
to take it out of the comparison (report both).

    .venv/bin/python bench/inprocess_bench.py --baseline /tmp/base --pairs 5
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 100
WARM_UP = 500


async def _backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    pending = b""
    while data := await reader.read(65536):
        pending += data
        while b"\r\n\r\n" in pending:
            _, _, pending = pending.partition(b"\r\n\r\n")
            writer.write(RESPONSE)
    writer.close()


async def _app(scope: Any, receive: Any, send: Any) -> None:  # never reached: all is routed
    await send({"type": "http.response.start", "status": 404, "headers": []})
    await send({"type": "http.response.body", "body": b""})


async def _measure(requests: int, settings: dict[str, Any] | None = None) -> float:
    """CPU us per request; ``settings`` are top-level configuration keys
    laid over the harness's own."""
    from balancekit.asgi import BalanceMiddleware

    server = await asyncio.start_server(_backend, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    config = {
        "transport": "httptools",
        "status": {"enabled": True},
        "pools": {"p": {"backends": [f"http://127.0.0.1:{port}"]}},
        "routes": [{"prefix": "/", "pool": "p"}],
        **(settings or {}),
    }
    middleware = BalanceMiddleware(_app, config=config)
    await middleware.balancer.astart()
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/api/x",
        "raw_path": b"/api/x",
        "query_string": b"",
        "headers": [(b"host", b"127.0.0.1:8080"), (b"user-agent", b"bench"), (b"accept", b"*/*")],
        "client": ("127.0.0.1", 5555),
        "server": ("127.0.0.1", 8080),
    }

    async def receive() -> Any:
        await asyncio.sleep(3600)  # no body, and the client never leaves

    async def send(message: Any) -> None:
        pass

    for _ in range(WARM_UP):
        await middleware(scope, receive, send)
    started = time.process_time()
    for _ in range(requests):
        await middleware(scope, receive, send)
    spent = time.process_time() - started
    await middleware.balancer.aclose()
    server.close()
    return spent / requests * 1e6


def _run_once(checkout: Path, requests: int, pin_malloc: bool) -> float:
    env = {**os.environ, "PYTHONPATH": str(checkout), "PYTHONSAFEPATH": "1"}
    if pin_malloc:
        env["MALLOC_MMAP_THRESHOLD_"] = str(1 << 20)
    command = ["taskset", "-c", "1", sys.executable, __file__, "--child", str(requests)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=True)
    package, us = done.stdout.split()
    if Path(package).resolve() != (checkout / "balancekit").resolve():
        raise SystemExit(f"{checkout}: balancekit was imported from {package}")
    return float(us)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, help="another checkout to compare with")
    parser.add_argument("--requests", type=int, default=5000, help="per run (default 5000)")
    parser.add_argument("--pairs", type=int, default=5, help="alternating runs (default 5)")
    parser.add_argument("--pin-malloc", action="store_true", help="fix glibc's mmap threshold")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        import balancekit

        us = asyncio.run(_measure(args.child))
        print(Path(balancekit.__file__).parent, f"{us:.1f}")
        return
    sides = {"working tree": ROOT}
    if args.baseline is not None:
        sides["baseline"] = args.baseline
    results: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(args.pairs):
        for name, checkout in sides.items():
            results[name].append(_run_once(checkout, args.requests, args.pin_malloc))
    print(f"CPU us per proxied GET, {args.pairs} runs of {args.requests} requests each")
    for name, values in results.items():
        print(f"  {name:13} min {min(values):6.1f}  median {statistics.median(values):6.1f}")
    if args.baseline is not None:
        ratio = min(results["working tree"]) / min(results["baseline"])
        print(f"  working tree / baseline (min): {ratio:.3f}")


if __name__ == "__main__":
    main()
