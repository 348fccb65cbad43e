"""The pure-Python ceiling: a reverse proxy with nothing but the bytes.

A reference for the benchmarks (bench/proxy_bench.py, bench/instructions_bench.py),
not a product: what an asyncio Protocol per connection, httptools' parsers
and uvloop cost per request when no feature at all runs, so that every
report shows balancekit against NGINX and against this. Next to
``balancekit serve`` the difference is what balancekit's features cost
(routing, the pool and its algorithm, health, counters, metrics, problem
answers, the protocol checks of RFC 9110/9112); next to NGINX, what Python
costs.

It still does what any honest HTTP/1.1 proxy must: keep-alive on both
sides, requests answered in order, hop-by-hop fields dropped both ways,
X-Forwarded-For and -Proto added, Date and Server replaced by its own
Date, the body framed for the client (Content-Length kept, else chunked),
request bodies passed on, back-pressure both ways (a full client socket
pauses the upstream's, and the reverse), kept-alive upstream connections
reused, round robin over the backends. Nothing else: no health checks,
retries, timeouts, limits or checks of what the client sends.

    .venv/bin/python bench/lean_proxy.py --port 8080 \\
        --backends http://127.0.0.1:9001,http://127.0.0.1:9002
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import itertools
import time
from email.utils import formatdate
from urllib.parse import urlsplit

import httptools

try:
    import uvloop
except ImportError:  # pragma: no cover - the bench's venv has it
    uvloop = None

# RFC 9110 section 7.6.1's list, as balancekit._forwarding has it: written
# out, not imported, so the ceiling imports nothing of balancekit (whose
# configuration alone would add pydantic to its memory and start-up).
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
REQUEST_DROP = HOP_BY_HOP | {b"x-forwarded-for", b"x-forwarded-proto"}
RESPONSE_DROP = HOP_BY_HOP | {b"date", b"server", b"content-length"}
REASONS = {200: b"OK", 204: b"No Content", 301: b"Moved Permanently", 304: b"Not Modified"}


class Clock:
    def __init__(self) -> None:
        self.second = 0
        self.line = b""

    def date(self) -> bytes:
        now = int(time.time())
        if now != self.second:
            self.second = now
            self.line = b"date: " + formatdate(now, usegmt=True).encode() + b"\r\n"
        return self.line


class Backends:
    """Round robin, and each backend's idle kept-alive connections."""

    def __init__(self, urls: list[str]) -> None:
        self.addresses = []
        for url in urls:
            parts = urlsplit(url)
            self.addresses.append((parts.hostname or "127.0.0.1", parts.port or 80))
        self.turn = itertools.cycle(range(len(self.addresses)))
        self.idle: list[list[Upstream]] = [[] for _ in self.addresses]


class Upstream(asyncio.Protocol):
    """One connection to a backend, answering one client exchange at a time."""

    def __init__(self, proxy: Proxy, index: int) -> None:
        self.proxy = proxy
        self.index = index
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.client: Client | None = None
        self.headers: list[bytes] = []
        self.length = False
        self.chunked = False
        self.pending = b""
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.client is None:
            self.close()  # bytes nobody asked for
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.client.upstream_failed()
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.client is not None:
            self.client.upstream_failed()

    def pause_writing(self) -> None:
        if self.client is not None and self.client.transport is not None:
            self.client.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.client is not None and self.client.transport is not None:
            self.client.transport.resume_reading()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    # httptools callbacks

    def on_message_begin(self) -> None:
        self.headers = []
        self.length = self.chunked = False

    def on_header(self, name: bytes, value: bytes) -> None:
        lowered = name.lower()
        if lowered == b"content-length":
            self.length = True
            self.headers.append(b"content-length: " + value + b"\r\n")
        elif lowered not in RESPONSE_DROP:
            self.headers.append(name + b": " + value + b"\r\n")

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status < 200:
            return
        client = self.client
        assert client is not None
        reason = REASONS.get(status, b"")
        head = [b"HTTP/1.1 %d %s\r\n" % (status, reason), self.proxy.clock.date(), *self.headers]
        if not self.length and status not in (204, 304):
            self.chunked = True
            head.append(b"transfer-encoding: chunked\r\n")
        if not client.keep_alive:
            head.append(b"connection: close\r\n")
        head.append(b"\r\n")
        self.pending = b"".join(head)
        client.answering = True

    def on_body(self, body: bytes) -> None:
        client = self.client
        if client is None or client.transport is None:
            return
        data = b"%x\r\n%s\r\n" % (len(body), body) if self.chunked else body
        if self.pending:
            data, self.pending = self.pending + data, b""
        client.transport.write(data)

    def on_message_complete(self) -> None:
        client = self.client
        if client is None or self.parser.get_status_code() < 200:
            return
        out = self.pending + (b"0\r\n\r\n" if self.chunked else b"")
        self.pending = b""
        keep = self.parser.should_keep_alive()
        self.client = None
        if keep and not self.closed:
            self.proxy.backends.idle[self.index].append(self)
        else:
            self.close()
        client.response_done(out)


class Client(asyncio.Protocol):
    """One client connection: requests in, in order, one upstream at a time."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.headers: list[bytes] = []
        self.body_chunked = False
        self.keep_alive = True
        self.upstream: Upstream | None = None
        self.answering = False  # the current response's head went out
        self.waiting: collections.deque[bytes] = collections.deque()  # pipelined heads
        self.peer = b"unknown"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        if peer:
            self.peer = peer[0].encode()

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        upstream = self.upstream
        if upstream is not None:  # mid-exchange: its answer can never be reused
            upstream.client = None
            upstream.close()

    def pause_writing(self) -> None:
        upstream = self.upstream
        if upstream is not None and upstream.transport is not None:
            upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        upstream = self.upstream
        if upstream is not None and upstream.transport is not None:
            upstream.transport.resume_reading()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    # httptools callbacks

    def on_message_begin(self) -> None:
        self.url = b""
        self.headers = []
        self.body_chunked = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        lowered = name.lower()
        if lowered == b"transfer-encoding":
            self.body_chunked = True
        elif lowered not in REQUEST_DROP:
            self.headers.append(name + b": " + value + b"\r\n")

    def on_headers_complete(self) -> None:
        parser = self.parser
        self.keep_alive = parser.should_keep_alive()
        head = [parser.get_method(), b" ", self.url, b" HTTP/1.1\r\n", *self.headers]
        head.append(b"x-forwarded-for: " + self.peer + b"\r\nx-forwarded-proto: http\r\n")
        if self.body_chunked:
            head.append(b"transfer-encoding: chunked\r\n")
        head.append(b"\r\n")
        request = b"".join(head)
        if self.upstream is not None or self.waiting:
            self.waiting.append(request)  # pipelined: after the one in progress
            if self.transport is not None:
                self.transport.pause_reading()
            return
        self.forward(request)

    def on_body(self, body: bytes) -> None:
        upstream = self.upstream
        if upstream is None or upstream.transport is None:
            return
        upstream.transport.write(b"%x\r\n%s\r\n" % (len(body), body) if self.body_chunked else body)

    def on_message_complete(self) -> None:
        upstream = self.upstream
        if self.body_chunked and upstream is not None and upstream.transport is not None:
            upstream.transport.write(b"0\r\n\r\n")

    # the exchange

    def forward(self, request: bytes) -> None:
        backends = self.proxy.backends
        index = next(backends.turn)
        idle = backends.idle[index]
        while idle:
            upstream = idle.pop()
            if not upstream.closed and upstream.transport is not None:
                upstream.client = self
                self.upstream = upstream
                upstream.transport.write(request)
                return
        task = asyncio.get_running_loop().create_task(self.connect(index, request))
        self.proxy.connecting.add(task)
        task.add_done_callback(self.proxy.connecting.discard)

    async def connect(self, index: int, request: bytes) -> None:
        loop = asyncio.get_running_loop()
        host, port = self.proxy.backends.addresses[index]
        try:
            _, upstream = await loop.create_connection(
                lambda: Upstream(self.proxy, index), host, port
            )
        except OSError:
            self.answer_502()
            return
        if self.transport is None:
            self.proxy.backends.idle[index].append(upstream)
            return
        upstream.client = self
        self.upstream = upstream
        assert upstream.transport is not None
        upstream.transport.write(request)

    def response_done(self, out: bytes) -> None:
        self.upstream = None
        self.answering = False
        if self.transport is None:
            return
        if out:
            self.transport.write(out)
        if not self.keep_alive:
            self.close()
        elif self.waiting:
            self.forward(self.waiting.popleft())
            if not self.waiting:
                self.transport.resume_reading()

    def upstream_failed(self) -> None:
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            upstream.client = None
        if self.answering:
            self.close()  # too late for a 502: the client sees the body cut
        else:
            self.answer_502()

    def answer_502(self) -> None:
        if self.transport is not None:
            self.transport.write(
                b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
            )
            self.close()


class Proxy:
    def __init__(self, backends: list[str]) -> None:
        self.backends = Backends(backends)
        self.clock = Clock()
        self.connecting: set[asyncio.Task[None]] = set()


async def main(port: int, backends: list[str]) -> None:
    proxy = Proxy(backends)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Client(proxy), "127.0.0.1", port, backlog=2048)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--backends", required=True, help="comma-separated http:// URLs")
    args = parser.parse_args()
    run = uvloop.run if uvloop is not None else asyncio.run
    with contextlib.suppress(KeyboardInterrupt):
        run(main(args.port, args.backends.split(",")))
