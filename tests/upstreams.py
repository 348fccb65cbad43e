"""The small upstream servers the tests proxy to.

``echo_app`` is a raw ASGI app run under uvicorn: it answers with what it
received, streams slowly, sleeps, sets cookies and serves big bodies.
``RawServer`` is a plain socket server for what no well-behaved HTTP server
does: garbage responses, resets, responses cut short.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs

MB = 1024 * 1024


def _query(scope: dict[str, Any]) -> dict[str, str]:
    parsed = parse_qs(scope.get("query_string", b"").decode())
    return {k: v[0] for k, v in parsed.items()}


async def _start(send: Any, status: int = 200, headers: list[tuple[bytes, bytes]] | None = None):
    await send({"type": "http.response.start", "status": status, "headers": headers or []})


async def complete_lifespan(receive: Any, send: Any) -> None:
    """Answer every lifespan message with its ``.complete``, until shutdown."""
    while True:
        message = await receive()
        await send({"type": message["type"] + ".complete"})
        if message["type"] == "lifespan.shutdown":
            return


def answering(name: str, status: int, headers: list[tuple[bytes, bytes]] | None = None) -> Any:
    """An upstream that answers every request with ``status``, names itself
    in a header and the body, and counts what it served (``app.hits``)."""
    hits: list[str] = []
    extra = headers or []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await complete_lifespan(receive, send)
            return
        hits.append(scope["method"])
        while (await receive()).get("more_body"):
            pass
        body = f"{name} says {status}".encode()
        head = [(b"x-backend", name.encode()), (b"content-type", b"text/plain"), *extra]
        await send({"type": "http.response.start", "status": status, "headers": head})
        await send({"type": "http.response.body", "body": body})

    app.hits = hits  # type: ignore[attr-defined]
    return app


def make_echo_app(name: str = "upstream") -> Any:
    """An upstream that names itself and records the paths it served."""
    seen: list[str] = []
    cancelled: list[str] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await complete_lifespan(receive, send)
            return
        if scope["type"] == "websocket":
            await _websocket(scope, receive, send)
            return
        path = scope["path"]
        seen.append(path)
        query = _query(scope)
        if path.startswith("/status/"):
            body = json.dumps({"backend": name}).encode()
            await _start(send, int(path.rsplit("/", 1)[1]))
            await send({"type": "http.response.body", "body": body})
            return
        if path == "/sleep":
            try:
                await asyncio.sleep(float(query.get("s", "1")))
            except asyncio.CancelledError:
                cancelled.append(path)
                raise
            await _start(send, 200, [(b"content-type", b"text/plain")])
            await send({"type": "http.response.body", "body": name.encode()})
            return
        if path == "/slow-headers":
            # Waits for the client to go away, and records that it noticed.
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    cancelled.append(path)
                    return
        if path == "/stream":
            chunks = int(query.get("chunks", "5"))
            delay = float(query.get("delay", "0.2"))
            await _start(send, 200, [(b"content-type", b"text/plain")])
            for i in range(chunks):
                await send(
                    {
                        "type": "http.response.body",
                        "body": f"chunk{i}\n".encode(),
                        "more_body": True,
                    }
                )
                await asyncio.sleep(delay)
            await send({"type": "http.response.body", "body": b""})
            return
        if path == "/big":
            size = int(float(query.get("mb", "50")) * MB)
            block = b"x" * (256 * 1024)
            await _start(send, 200, [(b"content-length", str(size).encode())])
            sent = 0
            while sent < size:
                part = block[: size - sent]
                sent += len(part)
                await send({"type": "http.response.body", "body": part, "more_body": sent < size})
            return
        if path == "/cookies":
            await _start(
                send, 200, [(b"set-cookie", b"a=1; Path=/"), (b"set-cookie", b"b=2; Path=/")]
            )
            await send({"type": "http.response.body", "body": b"ok"})
            return
        # Everything else: echo what came in.
        digest = hashlib.sha256()
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            digest.update(chunk)
            size += len(chunk)
            if not message.get("more_body", False):
                break
        body = json.dumps(
            {
                "backend": name,
                "method": scope["method"],
                "path": path,
                "raw_path": scope.get("raw_path", b"").decode("latin-1"),
                "query": scope.get("query_string", b"").decode("latin-1"),
                "headers": [
                    [k.decode("latin-1"), v.decode("latin-1")] for k, v in scope["headers"]
                ],
                "body_size": size,
                "body_sha256": digest.hexdigest(),
            }
        ).encode()
        await _start(
            send, 200, [(b"content-type", b"application/json"), (b"x-upstream", name.encode())]
        )
        await send({"type": "http.response.body", "body": body})

    app.seen = seen  # type: ignore[attr-defined]
    app.cancelled = cancelled  # type: ignore[attr-defined]
    return app


async def _websocket(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await receive()  # websocket.connect
    offered = scope.get("subprotocols") or []
    await send({"type": "websocket.accept", "subprotocol": offered[0] if offered else None})
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            return
        text = message.get("text")
        if text == "bye":
            await send({"type": "websocket.close", "code": 4001})
            return
        if text is not None:
            await send({"type": "websocket.send", "text": "echo:" + text})
        else:
            await send({"type": "websocket.send", "bytes": message.get("bytes", b"")[::-1]})


class SocketServer:
    """A threaded TCP server on 127.0.0.1 for raw, scripted HTTP.

    Each accepted connection gets a thread running :meth:`handle` (closed
    after it); ``stopping`` turns true at :meth:`close`, which joins them
    all. Subclasses set their own attributes before calling ``__init__``:
    the server accepts from then on.
    """

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.stopping = False
        self.accepting = threading.Event()
        self.accepting.set()
        self._threads: list[threading.Thread] = []
        self._accept = threading.Thread(target=self._serve, daemon=True)
        self._accept.start()

    def _serve(self) -> None:
        while not self.stopping:
            if not self.accepting.wait(0.1):
                continue
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            thread = threading.Thread(target=self._run, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _run(self, conn: socket.socket) -> None:
        with conn:
            self.handle(conn)

    def handle(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def stop_accepting(self) -> None:
        """Accept nothing more, with an accept queue of one: once it is full
        the kernel drops new SYNs, so connects hang as to a vanished host."""
        self.accepting.clear()
        self.sock.listen(0)

    def start_accepting(self) -> None:
        """Undo :meth:`stop_accepting`: the queued connections are served."""
        self.sock.listen(64)
        self.accepting.set()

    def chunks(self, conn: socket.socket) -> Iterator[bytes]:
        """What the peer sends, as it comes, until it closes or the server stops."""
        conn.settimeout(0.1)
        while not self.stopping:
            try:
                got = conn.recv(1 << 20)
            except TimeoutError:
                continue
            except OSError:
                return
            if not got:
                return
            yield got

    def close(self) -> None:
        self.stopping = True
        self._accept.join(timeout=2)
        for thread in self._threads:
            thread.join(timeout=5)
        self.sock.close()


class ScriptedUpstream(SocketServer):
    """Answers every request (read up to its blank line) with ``response``.

    ``keep_open``: the connection stays open for the next request, as a
    keep-alive server's would; otherwise it is closed after each answer.
    """

    def __init__(self, response: bytes, *, keep_open: bool = False) -> None:
        self.response = response
        self.keep_open = keep_open
        self.requests = 0
        super().__init__()

    def handle(self, conn: socket.socket) -> None:
        data = b""
        for got in self.chunks(conn):
            data += got
            while b"\r\n\r\n" in data:
                _, _, data = data.partition(b"\r\n\r\n")
                self.requests += 1
                try:
                    conn.sendall(self.response)
                except OSError:
                    return
                if not self.keep_open:
                    return


class RawServer(SocketServer):
    """A socket server answering every request with a fixed misbehaviour.

    ``mode``: ``garbage`` (not HTTP), ``reset`` (RST after reading the
    request), ``truncated`` (headers promise more body than is sent), or
    ``close`` (close without a word), or ``stall`` (never read the body,
    never answer, for 10 s at most). ``requests`` counts requests read.
    """

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.requests = 0
        super().__init__()

    def handle(self, conn: socket.socket) -> None:
        conn.settimeout(5)
        data = b""
        try:
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
        except OSError:
            return
        self.requests += 1
        if self.mode == "garbage":
            conn.sendall(b"THIS IS NOT HTTP\r\n\r\n")
        elif self.mode == "reset":
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        elif self.mode == "stall":
            deadline = time.monotonic() + 10
            while not self.stopping and time.monotonic() < deadline:
                time.sleep(0.05)
        elif self.mode == "truncated":
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"y" * 100)
        # "close": nothing at all


class NamedUpstream:
    """An upstream whose whole answer is its name, for counting who served what.

    ``delay`` (seconds) slows every answer down; it can be changed while the
    server runs. A request to a path ending in ``/hold`` is kept open until
    the test sets ``release`` (10 s at most); ``holding`` counts those open
    now. ``served`` counts answers given.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.delay = 0.0
        self.release = threading.Event()
        self.holding = 0
        self.served = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await complete_lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        if scope["path"].endswith("/hold"):
            self.holding += 1
            try:
                # release is set from the test's thread: wait for it off the loop.
                await asyncio.to_thread(self.release.wait, 10)
            finally:
                self.holding -= 1
        elif self.delay:
            await asyncio.sleep(self.delay)
        self.served += 1
        await _start(send, 200, [(b"content-type", b"text/plain")])
        await send({"type": "http.response.body", "body": self.name.encode()})
