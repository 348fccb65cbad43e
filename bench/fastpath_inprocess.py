"""The Python work of one request on ``balancekit serve``'s fast path, alone.

No sockets, no event-loop I/O, no load tool: the lean server's connection
protocol and the httptools transport's upstream connections are driven
directly, with transports that only count what is written to them. Each
request is one ``data_received`` of a request head on the client side and
one of a whole response (NGINX's headers, 100 bytes) on the upstream side,
on a kept-alive upstream connection: exactly the Python the fast path runs
per request, classify, the pick and the counters included, and nothing
else. Use it to see a few hundred nanoseconds move; use proxy_bench.py and
instructions_bench.py for what a client sees.

    .venv/bin/python bench/fastpath_inprocess.py               # us per request, 3 runs
    .venv/bin/python bench/fastpath_inprocess.py --profile     # calls per request, by function
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import time
from typing import Any

import uvloop

from balancekit import Balancer
from balancekit._server import LeanServer, _Connection as ClientConnection
from balancekit._transports.httptools import _Connection as UpstreamConnection
from balancekit.asgi import BalanceMiddleware, not_found

REQUEST = b"GET /bench?q=1 HTTP/1.1\r\nHost: bench\r\n\r\n"
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Fri, 04 Dec 2026 15:00:00 GMT\r\n"
    b"Content-Type: text/plain\r\nContent-Length: 100\r\n"
    b"Last-Modified: Fri, 04 Dec 2026 14:00:00 GMT\r\nConnection: keep-alive\r\n"
    b'ETag: "abc-64"\r\nAccept-Ranges: bytes\r\n\r\n' + b"x" * 100
)
BACKENDS = ["http://127.0.0.1:9001", "http://127.0.0.1:9002", "http://127.0.0.1:9003"]


class CountingTransport:
    """Takes writes and counts them; an upstream's reports that it was written to."""

    def __init__(self, written_to: list[UpstreamConnection], upstream: Any = None) -> None:
        self.written_to = written_to
        self.upstream = upstream
        self.bytes = 0
        self.closed = False

    def write(self, data: bytes) -> None:
        self.bytes += len(data)
        if self.upstream is not None:
            self.written_to.append(self.upstream)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 50000), "sockname": ("127.0.0.1", 8080)}.get(
            name, default
        )

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


async def run(requests: int, profile: bool) -> None:
    # The benchmark's configuration (bench/_apps.balancekit_config) without
    # its health check, which would probe the made-up backends.
    config = {
        "transport": "httptools",
        "pools": {"p": {"backends": BACKENDS, "algorithm": "round_robin"}},
        "routes": [{"prefix": "/", "pool": "p"}],
        "status": {"enabled": True, "path": "/_balancekit/"},
    }
    balancer = Balancer(config)
    app = BalanceMiddleware(not_found, balancer=balancer)
    await app.startup()
    server = LeanServer(app)
    transport = balancer.engine().transport
    loop = asyncio.get_running_loop()
    written_to: list[UpstreamConnection] = []
    for backend in balancer.pools["p"].backends:
        for _ in range(2):
            upstream = UpstreamConnection(loop, transport._read_buffer)  # type: ignore[attr-defined]
            upstream.connection_made(CountingTransport(written_to, upstream))  # type: ignore[arg-type]
            upstream.reused, upstream.idle_since = True, time.monotonic()
            upstream.complete, upstream.status = True, 200  # as after an answer
            transport.warm(backend)[1].append(upstream)  # type: ignore[attr-defined]
    client = ClientConnection(server)
    client_transport = CountingTransport(written_to)
    client.connection_made(client_transport)  # type: ignore[arg-type]

    def one() -> None:
        client.answered = 0  # not the 1,000-request close
        client.data_received(REQUEST)
        written_to.pop().data_received(RESPONSE)

    for _ in range(2000):
        one()
    fast = server.fast
    assert fast is not None and fast.answered == 2000 and not written_to
    if profile:
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(requests):
            one()
        profiler.disable()
        stats = pstats.Stats(profiler)
        print(f"{stats.total_calls / requests:.1f} calls per request (cProfile)")  # type: ignore[attr-defined]
        stats.sort_stats("tottime").print_stats(25)
    else:
        for _ in range(3):
            began = time.perf_counter()
            for _ in range(requests):
                one()
            print(f"{(time.perf_counter() - began) / requests * 1e6:.2f} us per request")
    await app.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--profile", action="store_true", help="cProfile instead of timing")
    args = parser.parse_args()
    uvloop.run(run(args.requests, args.profile))


if __name__ == "__main__":
    main()
