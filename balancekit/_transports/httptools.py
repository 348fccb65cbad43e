"""``transport = "httptools"``: balancekit's own HTTP/1.1 client.

asyncio Protocols and httptools' response parser, with nothing between the
socket and the engine but a keep-alive pool per backend:

- connections are reused last-in first-out (the warmest first), at most
  ``IDLE_PER_BACKEND`` kept idle, each for at most ``IDLE_SECONDS``; one
  that the backend closed, or that received bytes while idle, is dropped
  on checkout;
- a request whose reused connection dies before any byte of an answer is
  sent again once on a fresh connection when that is safe: an idempotent
  method whose body was not yet read, as browsers and NGINX do for stale
  keep-alives. A POST (or any method that is not idempotent) first polls
  a reused connection for a close the loop has not reported yet, and goes
  again only if the close came before its write;
- bodies stream both ways with back-pressure: the upstream's bytes pause
  the socket when ``READ_BUFFER`` is waiting unread, the request body waits
  for the socket to drain;
- connect, read (per wait) and write (per drain) timeouts; TLS for
  ``https://`` backends with their pool's context (``Backend.tls``), or
  verified against the system's CAs under the backend's host name. The
  pool's context is part of the keep-alive key: pools with different TLS
  never share a connection to the same address.

A HEAD answer, or any answer whose body is not read to its end, closes its
connection rather than risk its leftovers answering the next request.
"""

from __future__ import annotations

import asyncio
import collections
import select
import ssl
import time
from collections.abc import AsyncIterable
from typing import TYPE_CHECKING, Protocol

import httptools

from .._decision import IDEMPOTENT_METHODS
from .._exceptions import (
    ProxyError,
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
)

if TYPE_CHECKING:
    from .._backend import Backend
    from .._config import TimeoutsConfig
    from .._types import RawHeaders
    from .._upstream_tls import UpstreamTLS

#: A keep-alive pool's key: host, port, and the pool's TLS (or whether
#: the backend is https:// with the system's defaults).
_Key = tuple[str, int, "UpstreamTLS | bool"]

IDLE_PER_BACKEND = 100
IDLE_SECONDS = 30.0
#: How long aclose() lets closed connections finish their goodbye (a TLS
#: close_notify each way) before it drops them.
CLOSE_SECONDS = 1.0
#: Unread upstream bytes at which the socket stops being read.
READ_BUFFER = 256 * 1024

_IDEMPOTENT = frozenset(method.encode() for method in IDEMPOTENT_METHODS)


class _Stale(Exception):
    """A reused connection died before any byte of an answer."""


class Sink(Protocol):
    """Who takes a connection's answer by callbacks instead of awaiting it
    (the lean server's fast path): the head, each part of the body and the
    end, or the error, in that order, each from inside the loop's read."""

    def on_head(self) -> None: ...

    def on_body(self, body: bytes) -> None: ...

    def on_complete(self) -> None: ...

    def on_error(self, error: BaseException) -> None: ...


#: Bytes read from an upstream socket at once.
READ_SIZE = 64 * 1024


class _Connection(asyncio.BufferedProtocol):
    """One upstream connection; one exchange at a time.

    A buffered protocol: the loop reads into ``buffer`` instead of
    allocating a 256 KiB ``bytes`` per read (which glibc serves with an
    mmap/munmap pair in some processes: three syscalls per response). The
    transport's connections share one: they live in one event loop, and
    each read is parsed (its body copied out) in the callback that made it.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, buffer: memoryview) -> None:
        self.loop = loop
        self._buffer = buffer
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.idle_since = 0.0
        self.reused = False
        #: Set for one exchange driven by callbacks (see :class:`Sink`).
        self.sink: Sink | None = None
        #: The ``head`` of an exchange a sink takes: nobody awaits it.
        self._no_wait: asyncio.Future[None] = loop.create_future()
        self._no_wait.set_result(None)
        self._reset()
        self._drained: asyncio.Future[None] | None = None
        self._paused_writing = False
        #: Done when the socket is closed: after close(), a TLS connection
        #: still exchanges close_notify with the backend.
        self.lost: asyncio.Future[None] = loop.create_future()

    def _reset(self) -> None:
        self.head: asyncio.Future[None] = (
            self.loop.create_future() if self.sink is None else self._no_wait
        )
        self.status = 0
        self.headers: RawHeaders = []
        self.chunks: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.complete = False
        self.keep_alive = False
        self.error: BaseException | None = None
        self.got_bytes = False
        self.reading_paused = False
        self.waiter: asyncio.Future[None] | None = None
        self.active = False

    # --- asyncio.Protocol -----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        self._fd = -1 if sock is None else sock.fileno()

    def dropped(self) -> bool:
        """Whether the backend closed (or wrote to) this idle connection in a
        way the loop has not reported yet: a poll that does not wait, as
        urllib3 checks a pooled connection before it reuses it."""
        if self._fd < 0:
            return False
        try:
            return bool(select.select((self._fd,), (), (), 0)[0])
        except (OSError, ValueError):
            return True

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(self._buffer[:nbytes])

    def data_received(self, data: bytes | memoryview) -> None:
        if not self.active or self.complete:
            # Bytes nobody asked for: this connection can never be trusted again.
            self.close()
            return
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamProtocolError("upstream switched protocols unasked"))
        except httptools.HttpParserError as exc:
            self._fail(UpstreamProtocolError(f"upstream sent a malformed response: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.lost.done():
            self.lost.set_result(None)
        if self.active and not self.complete:
            if not self.got_bytes and self.reused:
                self._fail(_Stale())
            elif self.status and self._ends_at_close():
                self.complete = True  # a body delimited by the connection's end
                self._wake()
                if self.sink is not None:
                    self.sink.on_complete()
            else:
                self._fail(UpstreamError.closed())
        if self._drained is not None and not self._drained.done():
            self._drained.set_exception(ConnectionResetError("upstream closed the connection"))

    def pause_writing(self) -> None:
        self._paused_writing = True

    def resume_writing(self) -> None:
        self._paused_writing = False
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    # --- httptools callbacks -----------------------------------------------------

    def on_message_begin(self) -> None:
        if self.complete:  # a second answer to one request: never reuse this one
            self.close()

    def on_header(self, name: bytes, value: bytes) -> None:
        # After the head, httptools reports a chunked body's trailer fields
        # here too: dropped, as aiohttp and httpx drop them.
        if not self.status:
            self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        if self.complete:
            return
        status = self.parser.get_status_code()
        if status < 100:  # three digits, but no status class (found by fuzzing)
            self._fail(UpstreamProtocolError(f"upstream sent status {status:03d}"))
            return
        if 100 <= status < 200 and status != 101:
            self.headers = []  # an interim answer (100 Continue): the real one follows
            return
        self.status = status
        if self.sink is not None:
            self.sink.on_head()
        elif not self.head.done():
            self.head.set_result(None)

    def on_body(self, body: bytes) -> None:
        if self.complete:
            return
        if self.sink is not None:
            self.sink.on_body(body)
            return
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered >= READ_BUFFER and not self.reading_paused and self.transport:
            self.reading_paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self.status == 0 or self.complete:
            return  # the end of an interim answer
        # Asked now: the parser forgets the message's flags once it is over.
        self.keep_alive = self.parser.should_keep_alive()
        self.complete = True
        if self.sink is not None:
            self.sink.on_complete()
            return
        self._wake()

    # --- helpers -------------------------------------------------------------------

    def _ends_at_close(self) -> bool:
        names = {name for name, _ in self.headers}
        return b"content-length" not in names and b"transfer-encoding" not in names

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, error: BaseException) -> None:
        if self.error is None:
            self.error = error
        sink, self.sink = self.sink, None
        if sink is not None:
            self.close()
            sink.on_error(error)
            return
        if not self.head.done():
            self.head.set_exception(error)
            self.head.exception()  # retrieved: no "never retrieved" warning
        self._wake()
        self.close()

    def gone(self) -> bool:
        """Whether the connection is closed (it can close while we await)."""
        return self.closed

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    async def drain(self, seconds: float) -> None:
        if not self._paused_writing:
            return
        self._drained = self.loop.create_future()
        try:
            # asyncio.timeout, not wait_for: in 3.11 wait_for can swallow a
            # cancellation that arrives as the awaited thing completes.
            async with asyncio.timeout(seconds):
                await self._drained
        finally:
            self._drained = None

    def start(self, sink: Sink | None = None) -> None:
        """Ready for an exchange, awaited (``head``, ``read``) or, with a
        ``sink``, reported to it by callbacks."""
        # The parser is ready for the next response once the last one was
        # parsed whole (llhttp resets between messages); otherwise a new one.
        reuse = self.complete and self.error is None and self.status != 0
        self.sink = sink
        self._reset()
        self.active = True
        if not reuse:
            self.parser = httptools.HttpResponseParser(self)

    def timed_out(self) -> None:
        """The read timeout's timer: fail whoever waits, and drop the connection."""
        self._fail(UpstreamTimeout())


class HttptoolsResponse:
    __slots__ = ("_conn", "_head_request", "_pooled", "_read_timeout", "headers", "status")

    def __init__(
        self,
        conn: _Connection,
        read_timeout: float,
        pooled: collections.deque[_Connection],
        head_request: bool,
    ) -> None:
        self._conn = conn
        self._read_timeout = read_timeout
        self._pooled = pooled
        self._head_request = head_request
        self.status = conn.status
        self.headers = conn.headers

    async def read(self) -> bytes:
        conn = self._conn
        if self._head_request:
            return b""
        while True:
            if conn.chunks:
                chunk = conn.chunks.popleft()
                conn.buffered -= len(chunk)
                if conn.reading_paused and conn.buffered < READ_BUFFER // 2 and conn.transport:
                    conn.reading_paused = False
                    conn.transport.resume_reading()
                return chunk
            if conn.complete:
                return b""
            if conn.error is not None:
                raise _as_proxy_error(conn.error)
            # One timer per wait, not wait_for's task and callbacks.
            conn.waiter = conn.loop.create_future()
            timer = conn.loop.call_later(self._read_timeout, conn.timed_out)
            try:
                await conn.waiter
            finally:
                conn.waiter = None
                timer.cancel()

    async def aclose(self) -> None:
        give_back(self._conn, self._pooled, self._head_request)


def give_back(
    conn: _Connection, pooled: collections.deque[_Connection], head_request: bool = False
) -> None:
    """The exchange on ``conn`` is over: keep it alive in ``pooled`` if its
    answer was read whole and both sides allow it, else close it."""
    whole = conn.complete and not conn.chunks and not head_request
    reusable = whole and conn.keep_alive and not conn.closed
    conn.active = False
    if reusable and len(pooled) < IDLE_PER_BACKEND:
        conn.idle_since = time.monotonic()
        conn.reused = True
        pooled.append(conn)
    else:
        conn.close()


def _as_proxy_error(error: BaseException) -> ProxyError:
    return error if isinstance(error, ProxyError) else UpstreamError()


class HttptoolsTransport:
    name = "httptools"

    def __init__(self) -> None:
        # One transport serves one event loop (an engine's, a health check's).
        self._idle: dict[_Key, collections.deque[_Connection]] = {}
        # Every connection until its socket is closed, for aclose().
        self._open: set[_Connection] = set()
        self._tls: ssl.SSLContext | None = None
        self._read_buffer = memoryview(bytearray(READ_SIZE))

    def warm(self, backend: Backend) -> tuple[_Connection | None, collections.deque[_Connection]]:
        """A kept-alive connection to ``backend`` (the warmest) or None, and
        the pool it goes back to (:func:`give_back`)."""
        key = (backend.host, backend.port, backend.tls or backend.scheme == "https")
        return self._checkout(key)

    def _checkout(self, key: _Key) -> tuple[_Connection | None, collections.deque[_Connection]]:
        pooled = self._idle.get(key)
        if pooled is None:
            pooled = self._idle[key] = collections.deque()
        now = time.monotonic()
        while pooled:
            conn = pooled.pop()  # the warmest
            if not conn.closed and now - conn.idle_since < IDLE_SECONDS:
                return conn, pooled
            conn.close()
        return None, pooled

    async def _connect(self, backend: Backend, timeouts: TimeoutsConfig) -> _Connection:
        loop = asyncio.get_running_loop()
        context: ssl.SSLContext | None = None
        server_name = None
        tls = backend.tls
        if tls is not None:
            context, server_name = tls.context, tls.server_name or backend.host
        elif backend.scheme == "https":
            if self._tls is None:
                self._tls = ssl.create_default_context()
            context, server_name = self._tls, backend.host
        try:
            async with asyncio.timeout(timeouts.connect):  # see drain: not wait_for
                _, conn = await loop.create_connection(
                    lambda: _Connection(loop, self._read_buffer),
                    backend.host,
                    backend.port,
                    ssl=context,
                    server_hostname=server_name,
                )
        except TimeoutError:
            raise UpstreamTimeout.connecting() from None
        except (OSError, ssl.SSLError) as exc:
            raise UpstreamConnectError() from exc
        self._open.add(conn)
        conn.lost.add_done_callback(lambda _: self._open.discard(conn))
        return conn

    async def send(
        self,
        backend: Backend,
        method: str,
        target: str,
        headers: RawHeaders,
        body: AsyncIterable[bytes] | None,
        timeouts: TimeoutsConfig,
    ) -> HttptoolsResponse:
        conn, pooled = self.warm(backend)
        method_raw = method.encode("ascii")
        head = _request_head(
            method_raw, (backend.base_path + target).encode("latin-1"), headers, body
        )
        sent_body = written = False
        for _ in range(2):
            if conn is None:
                conn = await self._connect(backend, timeouts)
            try:
                conn.start()
                transport = conn.transport
                if transport is None or conn.closed:
                    raise _Stale
                # A request that may not be sent twice looks first, at one
                # syscall, for a close still on its way through the loop.
                if conn.reused and method_raw not in _IDEMPOTENT and conn.dropped():
                    raise _Stale
                written = True
                if body is None:  # the usual case: one write, no coroutine
                    transport.write(head)
                else:
                    sent_body = await self._write(conn, transport, head, body, headers, timeouts)
                timer = conn.loop.call_later(timeouts.read, conn.timed_out)
                try:
                    await conn.head
                finally:
                    timer.cancel()
            except _Stale:
                conn.close()
                # A kept-alive connection the backend had closed. Found before
                # the write, anything may go again on a fresh one; after it,
                # the backend may have the request (RFC 9110 section 9.2.2):
                # only an idempotent one whose body was not consumed.
                if written and (sent_body or method_raw not in _IDEMPOTENT):
                    raise UpstreamError.closed() from None
                conn = None
                continue
            except BaseException:  # the connection dropped, then raised again
                conn.close()
                raise
            return HttptoolsResponse(conn, timeouts.read, pooled, method_raw == b"HEAD")
        raise UpstreamError.closed()

    async def _write(
        self,
        conn: _Connection,
        transport: asyncio.Transport,
        head: bytes,
        body: AsyncIterable[bytes],
        headers: RawHeaders,
        timeouts: TimeoutsConfig,
    ) -> bool:
        """Send ``head`` and stream ``body`` after it; whether any body was read."""
        chunked = not any(name == b"content-length" for name, _ in headers)
        # The head goes out with the body's first part, in one write: a
        # client whose body turns out malformed (or who leaves first) never
        # reaches the upstream at all.
        pending = head
        started = False
        try:
            async for chunk in body:
                started = True
                if conn.gone():
                    break
                if chunked:
                    data = b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunk else b""
                else:
                    data = chunk
                if pending:
                    data, pending = pending + data, b""
                if data:
                    transport.write(data)
                await conn.drain(timeouts.write)
            if not conn.gone():
                end = pending + (b"0\r\n\r\n" if chunked else b"")
                if end:
                    transport.write(end)
        except TimeoutError:
            conn.close()
            raise UpstreamTimeout.writing() from None
        except ConnectionResetError as exc:
            if conn.error is not None and not conn.head.done():
                raise _as_proxy_error(conn.error) from exc
        return started

    async def aclose(self) -> None:
        for pooled in self._idle.values():
            while pooled:
                pooled.pop().close()
        self._idle.clear()
        # A closed TLS connection finishes its goodbye in the loop: wait for
        # it (briefly), so that none is left half-open when the loop ends
        # (``asyncio.run`` right after a health check), then drop the rest.
        closing = [conn for conn in self._open if conn.closed]
        if closing:
            await asyncio.wait([conn.lost for conn in closing], timeout=CLOSE_SECONDS)
        late = [conn for conn in closing if not conn.lost.done()]
        for conn in late:
            if conn.transport is not None:
                conn.transport.abort()
        if late:
            await asyncio.sleep(0)  # the loop closes an aborted socket on its next turn


def _request_head(
    method: bytes, target: bytes, headers: RawHeaders, body: AsyncIterable[bytes] | None
) -> bytes:
    lines = [method + b" " + target + b" HTTP/1.1"]
    has_length = False
    for name, value in headers:
        if name == b"content-length":
            has_length = True
        lines.append(name + b": " + value)
    if body is not None and not has_length:
        lines.append(b"transfer-encoding: chunked")
    lines.append(b"")
    lines.append(b"")
    return b"\r\n".join(lines)


__all__ = ["HttptoolsResponse", "HttptoolsTransport", "Sink", "give_back"]
