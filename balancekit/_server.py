"""The lean HTTP/1.1 server behind ``balancekit serve``.

uvicorn is a fine general ASGI server, but in front of a balancer most of
its per-request work is generality nobody asked for. This server is one
asyncio Protocol per connection with httptools' request parser, feeding
:class:`~balancekit.asgi.BalanceMiddleware` directly: routing, status page,
problem responses and every header rule are the middleware's, unchanged.
Per request it builds one small scope dict and one task; response heads are
written with the first body bytes in one call, bodies as they come.

What a front server owes its clients, it does here:

- keep-alive and pipelining (up to ``KEEP_ALIVE_REQUESTS`` per connection,
  as NGINX's ``keepalive_requests``): requests on one connection are answered in
  order; reading pauses while a pipelined request waits its turn;
- limits: a request head over ``MAX_HEAD_BYTES`` or ``MAX_HEADER_COUNT``
  fields is answered 431, a malformed one 400, and the connection closed;
  a head not complete within ``HEAD_TIMEOUT`` seconds is dropped
  (slowloris), an idle keep-alive connection after ``KEEP_ALIVE`` seconds;
- back-pressure both ways: a request body buffered past ``BODY_BUFFER``
  pauses reading until the engine takes it; a client that reads slowly
  makes ``send`` wait for the socket to drain;
- a client that leaves is reported to the engine as ``http.disconnect``;
- graceful shutdown: :meth:`LeanServer.shutdown` stops accepting, closes
  idle connections, lets in-flight requests finish (up to a deadline) and
  answers them with ``Connection: close``.

WebSocket upgrades are handed to uvicorn's WebSocket protocol, which runs
the same middleware through ASGI.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from email.utils import formatdate
from functools import partial
from http import HTTPStatus
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import httptools

from . import _proxy_protocol as proxy_protocol
from ._engine_core import MAX_HEADER_BYTES, MAX_HEADER_COUNT
from ._problem import problem, status_line
from ._types import Message

if TYPE_CHECKING:
    from ssl import SSLContext

    from ._fastpath import FastPath, _FastExchange
    from .asgi import BalanceMiddleware

logger = logging.getLogger("balancekit")

#: The request line and header fields together: the fields' limit (the
#: same for every adapter) and room for a long request target.
MAX_HEAD_BYTES = MAX_HEADER_BYTES + 4 * 1024
#: Seconds a client has to finish a TLS handshake.
HANDSHAKE_TIMEOUT = 10.0
HEAD_TIMEOUT = 10.0
KEEP_ALIVE = 5.0
#: Requests answered on one connection before it is closed (NGINX's
#: ``keepalive_requests``): kept-alive clients spread again over
#: ``--workers``, a new worker among them, instead of staying where the
#: first accept put them.
KEEP_ALIVE_REQUESTS = 1000
BODY_BUFFER = 256 * 1024

STATUS_LINES = {s.value: f"HTTP/1.1 {status_line(s.value)}\r\n".encode() for s in HTTPStatus}
_NO_BODY_STATUS = frozenset({204, 304})
_ASGI = {"version": "3.0", "spec_version": "2.3"}


class _Clock:
    """The Date header, formatted once a second rather than per response."""

    def __init__(self) -> None:
        self.second = 0
        self.header = b""

    def date(self) -> bytes:
        now = int(time.time())
        if now != self.second:
            self.second = now
            self.header = b"date: " + formatdate(now, usegmt=True).encode() + b"\r\n"
        return self.header


class _Cycle:
    """One request on a connection: its body in, its response out."""

    __slots__ = (
        "body",
        "body_done",
        "buffered",
        "chunked",
        "conn",
        "delivered",
        "disconnected",
        "expect_continue",
        "fast",
        "head",
        "head_request",
        "keep_alive",
        "response_done",
        "scope",
        "started",
        "task",
        "waiter",
    )

    def __init__(self, conn: _Connection, scope: dict[str, Any], keep_alive: bool) -> None:
        self.conn = conn
        self.scope = scope
        self.keep_alive = keep_alive
        self.head_request = scope["method"] == "HEAD"
        self.body: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.body_done = False
        self.delivered = False
        self.disconnected = False
        self.expect_continue = False
        self.waiter: asyncio.Future[None] | None = None
        self.started = False
        self.task: asyncio.Task[None] | None = None
        #: The exchange moving this request by callbacks, if it takes the
        #: fast path (balancekit._fastpath), until it ends or hands over.
        self.fast: _FastExchange | None = None
        self.head = b""
        self.chunked = False
        self.response_done = False

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def receive(self) -> Message:
        while True:
            if self.body:
                data = b"".join(self.body) if len(self.body) > 1 else self.body[0]
                self.body.clear()
                self.buffered = 0
                self.delivered = self.body_done
                self.conn.resume_body()
                return {"type": "http.request", "body": data, "more_body": not self.body_done}
            if self.body_done and not self.delivered:
                self.delivered = True
                return {"type": "http.request", "body": b"", "more_body": False}
            if self.disconnected or self.response_done:
                return {"type": "http.disconnect"}
            if self.expect_continue:
                # The client waits for this before sending its body; it goes
                # out only once the body is asked for, as uvicorn does.
                self.expect_continue = False
                if not self.started and self.conn.transport is not None:
                    self.conn.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            self.waiter = self.conn.loop.create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None

    async def send(self, message: Message) -> None:
        if self.disconnected or self.conn.closed:
            return
        conn = self.conn
        kind = message["type"]
        if kind == "http.response.start":
            if self.started:
                raise RuntimeError("response already started")
            self.started = True
            self.head = self._head(message["status"], message.get("headers", ()))
            return
        if kind != "http.response.body" or self.response_done:
            return
        body = message.get("body", b"")
        more = message.get("more_body", False)
        out = self.head
        self.head = b""
        if self.head_request:
            body = b""
        if self.chunked:
            if body:
                out += b"%x\r\n%s\r\n" % (len(body), body)
            if not more:
                out += b"0\r\n\r\n"
        else:
            out += body
        if out:
            conn.transport.write(out)  # type: ignore[union-attr]
        if not more:
            self.response_done = True
            self.wake()
            conn.response_complete(self)
        elif conn.write_paused:
            await conn.drained()

    def _head(self, status: int, headers: Any) -> bytes:
        line = STATUS_LINES.get(status) or f"HTTP/1.1 {status} \r\n".encode()
        parts = [line, self.conn.server.clock.date()]
        length = False
        for name, value in headers:
            if name == b"content-length":
                length = True
            elif name == b"connection":
                if value.lower() == b"close":
                    self.keep_alive = False
                continue
            parts += [name, b": ", value, b"\r\n"]
        return self.end_head(parts, status, length)

    def end_head(self, parts: list[bytes], status: int, length: bool) -> bytes:
        """The head from its status line and fields in ``parts``, with the
        framing and connection fields this response needs; ``length``:
        whether a Content-Length is among them."""
        if self.conn.server.stopping:
            self.keep_alive = False
        if status in _NO_BODY_STATUS or status < 200:
            pass
        elif not length and not self.head_request:
            if self.scope["http_version"] == "1.1":
                self.chunked = True
                parts.append(b"transfer-encoding: chunked\r\n")
            else:
                self.keep_alive = False  # the body ends with the connection
        if not self.keep_alive:
            parts.append(b"connection: close\r\n")
        elif self.scope["http_version"] == "1.0":
            # An HTTP/1.0 client keeps the connection only if told so
            # (RFC 9112 section 9.3 and appendix C.2.2).
            parts.append(b"connection: keep-alive\r\n")
        parts.append(b"\r\n")
        return b"".join(parts)


class _Connection(asyncio.Protocol):
    def __init__(self, server: LeanServer, source: tuple[str, int] | None = None) -> None:
        self.server = server
        self.app = server.app
        self.loop = server.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        # Any HTTP/1.x is parsed; on_headers_complete serves a minor version
        # above 1 as HTTP/1.1 and refuses 0.9 and 2+ (RFC 9112 section 2.3).
        self.parser.set_dangerous_leniencies(lenient_version=True)
        self.client: tuple[str, int] | None = None
        self.local: tuple[str, int] | None = None
        self.cycle: _Cycle | None = None  # the one being answered
        self.parsing: _Cycle | None = None  # the one being read
        self.pipeline: collections.deque[_Cycle] = collections.deque()
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_size = 0  # of the URL and fields parsed so far
        self.hosts = 0  # Host fields in the head
        self.framed = False  # a Transfer-Encoding field in the head
        self.in_body = False  # past the head: fields now are trailers
        self.expects_continue = False
        self.head_bytes = 0
        self.in_head = False
        self.head_started = 0.0
        self.idle_since = time.monotonic()
        self.answered = 0  # requests taken on this connection
        self.read_paused = False
        self.write_paused = False
        self._drain: asyncio.Future[None] | None = None
        self.closed = False
        #: With ``--proxy-protocol``: the bytes of the PROXY header so far,
        #: until it is complete (then None).
        self.proxy_header: bytes | None = b"" if server.reads_proxy_header else None
        #: The client a PROXY header read before the TLS handshake named.
        self.source = source

    # --- asyncio.Protocol ---------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        local = transport.get_extra_info("sockname")
        self.client = (peer[0], peer[1]) if isinstance(peer, tuple) else None
        if self.source is not None:
            self.client = self.source
        self.local = (local[0], local[1]) if isinstance(local, tuple) else None
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.connections.discard(self)
        for cycle in (self.cycle, self.parsing, *self.pipeline):
            if cycle is not None and not cycle.response_done:
                cycle.disconnected = True
                cycle.wake()
                if cycle.fast is not None:
                    cycle.fast.client_left()
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        if self.proxy_header is not None:
            data = self._proxy_header(data)
            if not data:
                return
        if not self.in_head and self.parsing is None:
            self.in_head = True
            self.head_started = time.monotonic()
            self.head_bytes = 0
        if self.in_head:
            self.head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self._upgrade(data[upgrade.args[0] :] if upgrade.args else b"")
            return
        except httptools.HttpParserError as exc:
            self._refuse(400, f"malformed request: {exc}")
            return
        # Still no end of the head: httptools keeps buffering a long line,
        # so the bound is kept here, not only on complete fields.
        if self.in_head and self.head_bytes > MAX_HEAD_BYTES + 4096:
            self._refuse(431, "request head too large")

    def _proxy_header(self, data: bytes) -> bytes:
        """Take the PROXY header from the front of the stream; what follows
        it, once it is complete. Until then the head timeout runs, so a
        header that dribbles in is bounded like a slow request head."""
        assert self.proxy_header is not None
        if not self.in_head:
            self.in_head = True
            self.head_started = time.monotonic()
        buffered = self.proxy_header + data
        try:
            header = proxy_protocol.parse(buffered)
        except proxy_protocol.ProxyHeaderError as exc:
            logger.info("closing a connection from %s: %s", self.client, exc)
            self.close()
            return b""
        if header is None:
            self.proxy_header = buffered
            return b""
        self.proxy_header = None
        self.in_head = False
        if header.source is not None:
            self.client = header.source
        return buffered[header.length :]

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        cycle = self.cycle
        if cycle is not None and cycle.fast is not None:
            cycle.fast.resume()
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    async def drained(self) -> None:
        if not self.write_paused or self.closed:
            return
        self._drain = self.loop.create_future()
        try:
            await self._drain
        finally:
            self._drain = None

    # --- httptools callbacks ------------------------------------------------

    def on_message_begin(self) -> None:
        self.url = b""
        self.headers = []
        self.head_size = 0
        self.hosts = 0
        self.framed = self.in_body = False
        self.expects_continue = False
        if not self.in_head:
            self.in_head = True
            self.head_started = time.monotonic()
            self.head_bytes = 0

    def on_url(self, url: bytes) -> None:
        self.url += url
        self.head_size += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.in_body:
            # A chunked body's trailer section: httptools reports it here
            # too. Trailer fields are never merged into the header section
            # (RFC 9110 section 6.5.1); as NGINX, they are dropped.
            return
        self.head_size += len(name) + len(value)
        name = name.lower()
        # llhttp keeps a value's trailing whitespace, which is not part of it
        # (RFC 9110 section 5.5): "Content-Length: 5 " is 5.
        value = value.rstrip(b" \t")
        if name == b"host":
            self.hosts += 1
        elif name == b"transfer-encoding":
            self.framed = True
        elif name == b"expect":
            self.expects_continue = value.lower() == b"100-continue"
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.in_head = False
        self.in_body = True
        if self.closed:
            return
        if self.head_size > MAX_HEAD_BYTES or len(self.headers) > MAX_HEADER_COUNT:
            self._refuse(431, "request head too large")
            return
        stated = self.parser.get_http_version()
        version = stated if stated == "1.1" else self._version(stated)
        if version is None:
            return
        # RFC 9112 section 3.2: exactly one Host, which HTTP/1.1 must send.
        if self.hosts > 1 or (not self.hosts and version == "1.1"):
            self._refuse(400, "more than one Host" if self.hosts else "no Host")
            return
        if self.parser.should_upgrade():
            return  # feed_data raises HttpParserUpgrade next: see _upgrade
        url = self.url
        if url[:1] == b"/" and b"#" not in url:  # origin-form, the usual case
            raw_path, _, query = url.partition(b"?")
        else:  # absolute-form, "*", a fragment: let the parser take it apart
            parsed = httptools.parse_url(url)
            raw_path, query = parsed.path or b"/", parsed.query or b""
        text = raw_path.decode("latin-1")
        scope = {
            "type": "http",
            "asgi": _ASGI,
            "http_version": version,
            "server": self.local,
            "client": self.client,
            "scheme": self.server.scheme,
            "method": self.parser.get_method().decode("ascii"),
            "root_path": "",
            "path": unquote(text) if "%" in text else text,
            "raw_path": raw_path,
            "query_string": query,
            "headers": self.headers,
        }
        self.answered += 1
        cycle = _Cycle(
            self, scope, self.parser.should_keep_alive() and self.answered < KEEP_ALIVE_REQUESTS
        )
        cycle.expect_continue = self.expects_continue
        self.parsing = cycle
        if self.cycle is None:
            self._start(cycle)
        else:
            self.pipeline.append(cycle)
            self._pause_reading()

    def _version(self, version: str) -> str | None:
        """The version a request other than HTTP/1.1 is served as, or None
        when it was refused (RFC 9112 sections 2.3 and 6.1)."""
        if version == "1.0":
            if self.framed:
                # Transfer-Encoding from HTTP/1.0 is faulty framing: the
                # body's end is unknowable, so the connection goes too.
                self._refuse(400, "Transfer-Encoding in an HTTP/1.0 request")
                return None
            return version
        if version[:2] == "1.":
            return "1.1"  # a later HTTP/1 minor version is served as HTTP/1.1
        if version[:1] == "0":  # no version in the request line, or HTTP/0.9
            self._refuse(400, "HTTP/0.9 is not served")
        else:
            self._refuse(505, f"HTTP/{version} is not served over HTTP/1")
        return None

    def on_body(self, body: bytes) -> None:
        cycle = self.parsing
        if cycle is None or cycle.response_done:
            return
        cycle.body.append(body)
        cycle.buffered += len(body)
        if cycle.buffered > BODY_BUFFER:
            self._pause_reading()
        cycle.wake()

    def on_message_complete(self) -> None:
        cycle = self.parsing
        if cycle is None:
            return
        self.parsing = None
        cycle.body_done = True
        cycle.wake()

    # --- cycles -------------------------------------------------------------

    def _start(self, cycle: _Cycle) -> None:
        self.cycle = cycle
        fast = self.server.fast
        if fast is not None:
            fast.take(self, cycle)
        else:
            self.spawn(cycle, partial(self.app, cycle.scope, cycle.receive, cycle.send))

    def spawn(self, cycle: _Cycle, work: Callable[[], Awaitable[None]]) -> None:
        """Answer ``cycle`` with a task awaiting ``work()`` (the app, or the
        engine going on with what the fast path began)."""
        task = cycle.task = self.loop.create_task(self._run(cycle, work))
        self.server.tasks.add(task)
        task.add_done_callback(self.server.tasks.discard)

    async def _run(self, cycle: _Cycle, work: Callable[[], Awaitable[None]]) -> None:
        try:
            await work()
        except asyncio.CancelledError:
            self.close()
            raise
        except Exception:  # the connection boundary: never the worker
            logger.exception("balancekit serve: unexpected error")
            if not cycle.started and not cycle.disconnected:
                status, headers, body = problem(500, "internal error", close=True)
                cycle.keep_alive = False
                start = {"type": "http.response.start", "status": status, "headers": headers}
                await cycle.send(start)
                await cycle.send({"type": "http.response.body", "body": body})
        if not cycle.response_done:
            self.close()  # unfinished: the client must see the response cut

    def response_complete(self, cycle: _Cycle) -> None:
        self.cycle = None
        if not cycle.keep_alive or self.closed:
            self.close()
            return
        if cycle is self.parsing:
            # Answered before its body was read whole: the rest would be
            # read as the next request. Close rather than guess.
            self.close()
            return
        self.idle_since = time.monotonic()
        if self.pipeline:
            self._start(self.pipeline.popleft())
        if not self.pipeline:
            self._resume_reading()

    def resume_body(self) -> None:
        if self.read_paused and not self.pipeline:
            self._resume_reading()

    def _pause_reading(self) -> None:
        if not self.read_paused and self.transport is not None:
            self.read_paused = True
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self.read_paused and self.transport is not None and not self.closed:
            self.read_paused = False
            self.transport.resume_reading()

    def _refuse(self, status: int, detail: str) -> None:
        if self.transport is None or self.closed:
            return
        answer = self.cycle is None or not self.cycle.started
        # A request already dispatched is abandoned: its body was malformed,
        # so nothing of it may reach an upstream that has not seen it yet.
        for cycle in (self.cycle, self.parsing, *self.pipeline):
            if cycle is not None and not cycle.response_done:
                cycle.disconnected = True
                cycle.wake()
                if cycle.task is not None:
                    cycle.task.cancel()
                if cycle.fast is not None:
                    cycle.fast.client_left()
        if answer:
            # The problem's headers hold the one Connection: close.
            _, headers, body = problem(status, detail, close=True)
            head = [STATUS_LINES[status], self.server.clock.date()]
            head += [n + b": " + v + b"\r\n" for n, v in headers]
            self.transport.write(b"".join(head) + b"\r\n" + body)
        self.close()

    def _upgrade(self, rest: bytes) -> None:
        upgrade = dict(self.headers).get(b"upgrade", b"").lower()
        if upgrade != b"websocket" or self.transport is None:
            self._refuse(400, "unsupported upgrade")
            return
        # Hand the connection to uvicorn's WebSocket protocol, as uvicorn's
        # own server does.
        self.server.connections.discard(self)
        method = self.parser.get_method()
        head = [method, b" ", self.url, b" HTTP/1.1\r\n"]
        for name, value in self.headers:
            head += [name, b": ", value, b"\r\n"]
        head.append(b"\r\n")
        protocol = self.server.websocket_protocol()
        protocol.connection_made(self.transport)
        protocol.data_received(b"".join(head) + rest)
        self.transport.set_protocol(protocol)

    def close(self) -> None:
        if not self.closed and self.transport is not None:
            self.closed = True
            self.transport.close()

    def idle(self) -> bool:
        return self.cycle is None and self.parsing is None and not self.in_head

    def time_out(self) -> None:
        """Drop an expired connection; a head begun and left unfinished is
        told why (408, as Apache does), an idle keep-alive is just closed."""
        if self.in_head and self.head_bytes:
            self._refuse(408, "request head not received in time")
        else:
            self.close()

    def expired(self, now: float) -> bool:
        """A head read too slowly (slowloris), or a keep-alive left idle."""
        if self.in_head and self.parsing is None:
            return now - self.head_started > HEAD_TIMEOUT
        return self.idle() and now - self.idle_since > KEEP_ALIVE


class LeanServer:
    """Serves one :class:`~balancekit.asgi.BalanceMiddleware` on sockets."""

    def __init__(
        self,
        app: BalanceMiddleware,
        ssl: SSLContext | None = None,
        *,
        proxy_protocol: bool = False,
        fast: bool = True,
    ) -> None:
        self.app = app
        #: The callback path for the common request (balancekit._fastpath);
        #: ``fast=False`` sends every request through the app's coroutines.
        self.fast: FastPath | None = None
        if fast:
            from ._fastpath import FastPath
            from .asgi import BalanceMiddleware

            # Only the middleware itself: a wrapper (the tracing ServerSpan)
            # must see every request, so it is left the coroutine path.
            if type(app) is BalanceMiddleware:
                self.fast = FastPath(app)
        #: A PROXY protocol header (v1 or v2) starts every connection.
        self.proxy_protocol = proxy_protocol
        #: TLS at the edge: the context every connection's handshake uses.
        self.ssl = ssl
        #: Whether a connection's protocol reads the PROXY header itself. With
        #: TLS the header comes before the handshake, so it is read from the
        #: socket before asyncio sees the connection (see _accept_proxied).
        self.reads_proxy_header = proxy_protocol and ssl is None
        self.scheme = "https" if ssl is not None else "http"
        self.loop = asyncio.get_running_loop()
        self.connections: set[_Connection] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.clock = _Clock()
        self.stopping = False
        self._servers: list[asyncio.Server] = []
        self._reaper: asyncio.Task[None] | None = None
        self._ws: Any = None
        #: With PROXY before TLS: the accept loops, and connections whose
        #: header or handshake is still on its way.
        self._accepting: list[asyncio.Task[None]] = []
        self._arriving: set[asyncio.Task[None]] = set()

    async def start(self, sockets: list[Any]) -> None:
        await self.app.startup()
        for sock in sockets:
            if self.proxy_protocol and self.ssl is not None:
                sock.listen(2048)
                sock.setblocking(False)
                self._accepting.append(self.loop.create_task(self._accept_proxied(sock)))
                continue
            server = await self.loop.create_server(
                lambda: _Connection(self),
                sock=sock,
                backlog=2048,
                ssl=self.ssl,
                # A handshake that stalls is dropped, never waited on.
                ssl_handshake_timeout=HANDSHAKE_TIMEOUT if self.ssl is not None else None,
            )
            self._servers.append(server)
        self._reaper = self.loop.create_task(self._reap())

    async def _accept_proxied(self, listening: socket.socket) -> None:
        """Accept connections that begin with a PROXY header and then a TLS
        handshake: the header is read off the socket to its last byte and
        no further, so the handshake that follows is asyncio's as usual."""
        while True:
            try:
                sock, _ = await self.loop.sock_accept(listening)
            except OSError as exc:  # EMFILE and the like: the next one may do
                logger.warning("accepting a connection failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            task = self.loop.create_task(self._arrive(sock))
            self._arriving.add(task)
            task.add_done_callback(self._arriving.discard)

    async def _arrive(self, sock: socket.socket) -> None:
        try:
            async with asyncio.timeout(HEAD_TIMEOUT):
                header = await self._read_proxy_header(sock)
            source = header.source
            await self.loop.connect_accepted_socket(
                lambda: _Connection(self, source),
                sock,
                ssl=self.ssl,
                ssl_handshake_timeout=HANDSHAKE_TIMEOUT,
            )
        except (proxy_protocol.ProxyHeaderError, TimeoutError, OSError) as exc:
            # ssl.SSLError is an OSError: a failed handshake lands here too.
            logger.info("closing a connection: %s", str(exc) or type(exc).__name__)
            sock.close()

    async def _read_proxy_header(self, sock: socket.socket) -> proxy_protocol.ProxyHeader:
        """The PROXY header at the front of ``sock``, consumed exactly: bytes
        are taken only once known to belong to it (all of them while it is
        incomplete, its last ones by length once it is whole)."""
        taken = b""
        while True:
            await self._readable(sock)
            try:
                waiting = sock.recv(proxy_protocol.V2_MAX, socket.MSG_PEEK)
            except BlockingIOError:
                continue
            if not waiting:
                raise proxy_protocol.ProxyHeaderError("closed before its PROXY header")
            header = proxy_protocol.parse(taken + waiting)
            if header is None:
                taken += sock.recv(len(waiting))
                continue
            rest = header.length - len(taken)
            while rest:
                rest -= len(sock.recv(rest))
            return header

    async def _readable(self, sock: socket.socket) -> None:
        ready = self.loop.create_future()
        self.loop.add_reader(sock.fileno(), ready.set_result, None)
        try:
            await ready
        finally:
            self.loop.remove_reader(sock.fileno())

    async def _reap(self) -> None:
        # One sweep a second instead of a timer per connection.
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for conn in list(self.connections):
                if conn.expired(now):
                    conn.time_out()
                elif conn.cycle is not None and conn.cycle.fast is not None:
                    conn.cycle.fast.check_read()

    def websocket_protocol(self) -> asyncio.Protocol:
        if self._ws is None:
            import uvicorn
            from uvicorn.server import ServerState

            config = uvicorn.Config(
                self.app, ws="auto", lifespan="off", proxy_headers=False, log_level="warning"
            )
            config.load()
            self._ws = (config, ServerState())
        config, state = self._ws
        protocol: asyncio.Protocol = config.ws_protocol_class(
            config=config, server_state=state, app_state={}
        )
        return protocol

    def _busy(self) -> bool:
        # Tasks, and requests the fast path moves without one.
        return bool(self.tasks) or any(conn.cycle is not None for conn in self.connections)

    async def shutdown(self, grace: float = 30.0) -> None:
        """Stop accepting, let in-flight requests finish, then close."""
        self.stopping = True
        for server in self._servers:
            server.close()
        for task in [*self._accepting, *self._arriving]:
            task.cancel()
        for conn in list(self.connections):
            if conn.idle():
                conn.close()
        deadline = time.monotonic() + grace
        while self._busy() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            for conn in list(self.connections):
                if conn.idle():
                    conn.close()
        for task in list(self.tasks):
            task.cancel()
        for conn in list(self.connections):
            conn.close()
        if self._reaper is not None:
            self._reaper.cancel()
        if self._ws is not None:
            for conn in list(self._ws[1].connections):
                conn.shutdown()
        for server in self._servers:
            await server.wait_closed()
        await self.app.shutdown()


__all__ = ["LeanServer"]
