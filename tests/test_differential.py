"""Differential: the same exchanges through ``transport = "httptools"`` and
through aiohttp must look the same to the backend and to the client.

A scripted upstream parses each request with httptools and answers with
exact bytes (drips, interim answers, early closes and resets included); a
raw-socket client sends exact bytes and records what came back. Each case
runs through a balancer on each transport, and the two records are compared
field by field. The corpus is the one issue 10 names: chunked both ways,
50 MB both ways, HEAD, 204, 304, 100-continue, repeated headers, odd header
case, slow drips, early close, reset mid-body, plus bodies ended by close,
HTTP/1.0 and garbage.
"""

from __future__ import annotations

import hashlib
import json
import socket
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httptools
import pytest

from tests.helpers import balanced
from tests.upstreams import SocketServer

#: Transports compared with the reference (aiohttp).
#: (reference, candidate): balancekit's own transport against aiohttp under
#: uvicorn, and ``balancekit serve``'s lean server with its fast path
#: ("lean") against the same server with it off ("lean-slow": every
#: request on the coroutine path), so that the two paths are held alike.
#: The lean pair's cases run on a kept-alive upstream connection, which one
#: request sent first leaves in the pool: a request that must connect is
#: handed to the coroutine path, so only then does "lean" move the case's
#: bytes by its callbacks.
CANDIDATES = [("aiohttp", "httptools", False), ("lean-slow", "lean", True)]
BIG = 50 * 1024 * 1024

# --- what the backend does -----------------------------------------------------------

#: An upstream script step: bytes to send, seconds to sleep, "close" or "reset".
Step = bytes | float | str


def head(status: str, *headers: str) -> bytes:
    lines = [f"HTTP/1.1 {status}", *headers, "", ""]
    return "\r\n".join(lines).encode("latin-1")


def dripped(data: bytes, size: int, pause: float) -> list[Step]:
    steps: list[Step] = []
    for start in range(0, len(data), size):
        steps += [data[start : start + size], pause]
    return steps


def big_body_steps() -> list[Step]:
    block = bytes(range(256)) * 4096  # 1 MiB
    steps: list[Step] = [head("200 OK", f"Content-Length: {BIG}")]
    return steps + [block] * (BIG // len(block))


CHUNKED_DOWN = (
    head("200 OK", "Transfer-Encoding: chunked", "Content-Type: text/plain")
    + b"5\r\nhello\r\n1;ext=1\r\n \r\n6\r\nworld!\r\n0\r\nX-Trailer: t\r\n\r\n"
)

#: What the upstream answers for each case, by the request path /d/<case>.
SCRIPTS: dict[str, Callable[[], list[Step]]] = {
    "plain": lambda: [head("200 OK", "Content-Length: 5", "X-Up: 1") + b"hello"],
    "chunked-down": lambda: [CHUNKED_DOWN],
    "chunked-up": lambda: [head("200 OK", "Content-Length: 2") + b"ok"],
    "length-up": lambda: [head("200 OK", "Content-Length: 2") + b"ok"],
    "big-down": big_body_steps,
    "big-up": lambda: [head("200 OK", "Content-Length: 2") + b"ok"],
    "head": lambda: [head("200 OK", "Content-Length: 1234", "Content-Type: text/html")],
    "no-content": lambda: [head("204 No Content", "X-Done: yes")],
    "not-modified": lambda: [head("304 Not Modified", 'ETag: "v1"', "Cache-Control: max-age=9")],
    "expect-continue": lambda: [head("201 Created", "Content-Length: 7") + b"created"],
    "repeated-headers": lambda: [
        head(
            "200 OK",
            "Set-Cookie: a=1; Path=/",
            "Set-Cookie: b=2; HttpOnly",
            "Set-Cookie: c=3",
            "X-Dup: one",
            "X-Dup: two",
            "Content-Length: 0",
        )
    ],
    "odd-case": lambda: [
        head("200 OK", "X-MiXeD-CaSe: Value", "CONTENT-type: text/PLAIN", "content-LENGTH: 2")
        + b"ok"
    ],
    "drip": lambda: dripped(CHUNKED_DOWN, 7, 0.002),
    "slow-upload": lambda: [head("200 OK", "Content-Length: 2") + b"ok"],
    "early-close": lambda: [head("200 OK", "Content-Length: 100") + b"0123456789", 0.05, "close"],
    "reset-mid-body": lambda: [
        head("200 OK", "Content-Length: 100") + b"0123456789",
        0.05,
        "reset",
    ],
    "reset-before-head": lambda: ["reset"],
    "close-before-head": lambda: ["close"],
    "close-delimited": lambda: [
        head("200 OK", "Connection: close", "Content-Type: text/plain") + b"until the end",
        0.02,
        b" and more",
        "close",
    ],
    "http10": lambda: [b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nold school", "close"],
    "garbage": lambda: [b"NOT HTTP AT ALL\r\n\r\n", "close"],
    "bad-status": lambda: [b"HTTP/1.1 999 Nine\r\nContent-Length: 0\r\n\r\n"],
    "no-status-class": lambda: [b"HTTP/1.1 052 OK\r\nContent-Length: 0\r\n\r\n"],
}


@dataclass
class Seen:
    """One request as the backend parsed it."""

    method: str = ""
    target: str = ""
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)


class _RequestParsing:
    """httptools callbacks collecting requests off one connection."""

    def __init__(self, on_head: Callable[[Seen], None]) -> None:
        self.on_head = on_head
        self.current = Seen()
        self.done: list[Seen] = []
        self.parser = httptools.HttpRequestParser(self)

    def on_url(self, url: bytes) -> None:
        self.current.target += url.decode("latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        self.current.headers.append((name.decode("latin-1").lower(), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        self.current.method = self.parser.get_method().decode()
        self.on_head(self.current)

    def on_body(self, body: bytes) -> None:
        self.current.body += body

    def on_message_complete(self) -> None:
        self.done.append(self.current)
        self.current = Seen()


class ScriptedBackend(SocketServer):
    """A raw HTTP/1.1 server answering each request by its case's script."""

    def __init__(self) -> None:
        self.seen: list[Seen] = []
        super().__init__()

    def handle(self, conn: socket.socket) -> None:
        def on_head(seen: Seen) -> None:
            if ("expect", "100-continue") in seen.headers:
                conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")

        parsing = _RequestParsing(on_head)
        for data in self.chunks(conn):
            try:
                parsing.parser.feed_data(data)
            except httptools.HttpParserError:
                return
            while parsing.done:
                seen = parsing.done.pop(0)
                self.seen.append(seen)
                if not self._answer(conn, seen):
                    return

    def _answer(self, conn: socket.socket, seen: Seen) -> bool:
        """Play the case's script; False when it ended the connection."""
        case = seen.target.split("?")[0].rsplit("/", 1)[-1]
        try:
            for step in SCRIPTS[case]():
                if isinstance(step, bytes):
                    conn.sendall(step)
                elif isinstance(step, float):
                    time.sleep(step)
                elif step == "close":
                    return False
                else:  # reset: RST instead of FIN
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    return False
        except OSError:
            return False
        return True


# --- what the client does ------------------------------------------------------------


@dataclass
class Answer:
    """One response as the client parsed it."""

    status: int = 0
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)
    complete: bool = False
    interim: list[int] = field(default_factory=list)


class _ResponseParsing:
    def __init__(self, head_request: bool) -> None:
        self.head_request = head_request  # the parser cannot know: no body follows
        self.answer = Answer()
        self.parser = httptools.HttpResponseParser(self)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.answer.headers.append((name.decode("latin-1").lower(), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status < 200:
            self.answer.interim.append(status)
            self.answer.headers = []
        else:
            self.answer.status = status
            self.answer.complete = self.head_request

    def on_body(self, body: bytes) -> None:
        self.answer.body += body

    def on_message_complete(self) -> None:
        if self.answer.status:
            self.answer.complete = True


#: A client script step: bytes to send, seconds to sleep, or "continue" to
#: wait for the interim 100 Continue.
ClientStep = bytes | float | str


def request(method: str, case: str, *headers: str, body: bytes = b"", host: str = "proxy") -> bytes:
    # A fixed request id: one made per request would differ between transports.
    lines = [f"{method} /api/d/{case}?q=1 HTTP/1.1", f"Host: {host}", "Connection: close"]
    lines += ["X-Request-ID: differential", *headers]
    return "\r\n".join([*lines, "", ""]).encode("latin-1") + body


def chunked(parts: list[bytes]) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"


def big_upload() -> list[ClientStep]:
    block = bytes(range(256)) * 4096
    steps: list[ClientStep] = [request("POST", "big-up", f"Content-Length: {BIG}")]
    return steps + [block] * (BIG // len(block))


UPLOAD_PARTS = [b"first ", b"second ", b"x" * 70_000, b" last"]

#: What the client sends for each case.
CLIENTS: dict[str, Callable[[], list[ClientStep]]] = {
    "plain": lambda: [request("GET", "plain", "Accept: */*", "User-Agent: diff/1")],
    "chunked-down": lambda: [request("GET", "chunked-down")],
    "chunked-up": lambda: [
        request("POST", "chunked-up", "Transfer-Encoding: chunked", body=chunked(UPLOAD_PARTS))
    ],
    "length-up": lambda: [
        request("PUT", "length-up", "Content-Length: 1000000", body=b"L" * 1_000_000)
    ],
    "big-down": lambda: [request("GET", "big-down")],
    "big-up": big_upload,
    "head": lambda: [request("HEAD", "head")],
    "no-content": lambda: [request("DELETE", "no-content")],
    "not-modified": lambda: [request("GET", "not-modified", 'If-None-Match: "v1"')],
    "expect-continue": lambda: [
        request("POST", "expect-continue", "Expect: 100-continue", "Content-Length: 11"),
        "continue",
        b"hello there",
    ],
    "repeated-headers": lambda: [
        request("GET", "repeated-headers", "X-Multi: 1", "X-Multi: 2", "Cookie: a=1; b=2")
    ],
    "odd-case": lambda: [request("GET", "odd-case", "X-OdD-CaSe: Yes", "aCCEPT: text/html")],
    "drip": lambda: [request("GET", "drip")],
    "slow-upload": lambda: [
        request("POST", "slow-upload", "Transfer-Encoding: chunked"),
        *[
            step
            for part in UPLOAD_PARTS[:2] + [b"third"]
            for step in (b"%x\r\n%s\r\n" % (len(part), part), 0.03)
        ],
        b"0\r\n\r\n",
    ],
    "early-close": lambda: [request("GET", "early-close")],
    "reset-mid-body": lambda: [request("GET", "reset-mid-body")],
    "reset-before-head": lambda: [
        request("POST", "reset-before-head", "Content-Length: 2", body=b"hi")
    ],
    "close-before-head": lambda: [request("GET", "close-before-head")],
    "close-delimited": lambda: [request("GET", "close-delimited")],
    "http10": lambda: [request("GET", "http10")],
    "garbage": lambda: [request("GET", "garbage")],
    "bad-status": lambda: [request("GET", "bad-status")],
    "no-status-class": lambda: [request("GET", "no-status-class")],
}


def exchange(port: int, steps: list[ClientStep]) -> Answer:
    """Send ``steps`` to 127.0.0.1:``port`` and parse what comes back until close."""
    first = steps[0]
    parsing = _ResponseParsing(head_request=isinstance(first, bytes) and first[:5] == b"HEAD ")
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.settimeout(10)
        for step in steps:
            if isinstance(step, bytes):
                sock.sendall(step)
            elif isinstance(step, float):
                time.sleep(step)
            else:  # wait for the interim answer before the body
                while not parsing.answer.interim:
                    data = sock.recv(65536)
                    if not data:
                        break
                    parsing.parser.feed_data(data)
        while True:
            try:
                data = sock.recv(1 << 20)
            except ConnectionResetError:
                break
            if not data:
                break
            try:
                parsing.parser.feed_data(data)
            except httptools.HttpParserError:
                break
    return parsing.answer


# --- comparing ----------------------------------------------------------------------

#: Added by the client-facing server, not by the transport.
SERVER_HEADERS = {"date", "server"}


def client_view(answer: Answer) -> dict[str, Any]:
    headers = [(k, v) for k, v in answer.headers if k not in SERVER_HEADERS]
    body: Any = _digest(answer.body)
    if ("content-type", "application/problem+json") in headers:
        problem = json.loads(answer.body)
        problem.pop("detail", None)  # worded from each library's own error
        body = problem
        headers = [(k, v) for k, v in headers if k != "content-length"]
    return {
        "status": answer.status,
        "interim": answer.interim,
        "headers": headers,
        "body": body,
        "complete": answer.complete,
    }


def backend_view(seen: list[Seen]) -> list[dict[str, Any]]:
    return [
        {
            "method": s.method,
            "target": s.target,
            # Framing may differ (chunked or a length) as long as the body
            # does; the header order is the client's order plus X-Forwarded-*.
            "headers": [(k, v) for k, v in s.headers if k not in ("content-length",)],
            "body": _digest(s.body),
        }
        for s in seen
    ]


def _digest(data: bytes | bytearray) -> str:
    if len(data) <= 200:
        return bytes(data).decode("latin-1")
    return f"{len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()[:16]}"


@pytest.fixture
def backend() -> Iterator[ScriptedBackend]:
    server = ScriptedBackend()
    yield server
    server.close()


def run_case(
    serve: Callable[..., Any],
    backend: ScriptedBackend,
    transport: str,
    case: str,
    *,
    warm: bool = False,
) -> tuple[dict[str, Any], list[dict[str, Any]], Any]:
    """What the client and the backend saw of ``case``, and the proxy;
    ``warm``: after a "plain" exchange has left a kept-alive upstream
    connection."""
    # No retries: a retried failure would show the backend twice as many
    # requests on one transport that detects the failure differently.
    server, _ = balanced(serve, [backend.url], engine=transport, pool={"retries": {"attempts": 1}})
    if warm:
        assert exchange(server.port, CLIENTS["plain"]()).complete
    backend.seen.clear()
    answer = exchange(server.port, CLIENTS[case]())
    deadline = time.monotonic() + 2
    while not backend.seen and time.monotonic() < deadline and case != "garbage":
        time.sleep(0.01)
    return client_view(answer), backend_view(backend.seen), server


@pytest.mark.parametrize(
    ("base", "candidate", "warm"), CANDIDATES, ids=[c for _, c, _ in CANDIDATES]
)
@pytest.mark.parametrize("case", sorted(SCRIPTS))
def test_same_exchange_on_every_transport(
    serve: Callable[..., Any],
    backend: ScriptedBackend,
    case: str,
    base: str,
    candidate: str,
    warm: bool,
) -> None:
    reference = run_case(serve, backend, base, case, warm=warm)
    observed = run_case(serve, backend, candidate, case, warm=warm)
    assert observed[1] == reference[1], f"{case}: the backend saw different requests"
    assert observed[0] == reference[0], f"{case}: the client saw different answers"
    # And both are right, not merely alike: spot checks of the corpus.
    client, seen, proxy = observed
    first = CLIENTS[case]()[0]
    if candidate == "lean" and isinstance(first, bytes) and first.startswith(b"GET "):
        # The case itself was the fast path's (and so was the warm-up,
        # handed over to connect): answered there whole, cut there, or
        # handed over when its try failed before a head.
        fast = proxy.server.fast
        assert fast.begun == 2, f"{case}: not begun on the fast path"
        if client["complete"] and client["status"] == 200:
            assert fast.answered == 1, f"{case}: answered on the coroutine path"
    expected_status = {
        "garbage": 502,
        "bad-status": 502,
        "no-status-class": 502,
        "reset-before-head": 502,
        "close-before-head": 502,
    }.get(case)
    if expected_status is not None:
        assert client["status"] == expected_status
    elif case in ("early-close", "reset-mid-body"):
        assert client["status"] == 200 and not client["complete"]
    else:
        assert client["complete"], f"{case}: {client}"
    if case == "big-down":
        assert client["body"] == _digest((bytes(range(256)) * 4096) * (BIG // (1 << 20)))
    if case == "big-up":
        assert seen[0]["body"] == _digest((bytes(range(256)) * 4096) * (BIG // (1 << 20)))
    if case == "repeated-headers":
        cookies = [v for k, v in client["headers"] if k == "set-cookie"]
        assert cookies == ["a=1; Path=/", "b=2; HttpOnly", "c=3"]
        assert [v for k, v in seen[0]["headers"] if k == "x-multi"] == ["1", "2"]
    if case == "head":
        assert ("content-length", "1234") in client["headers"] and client["body"] == ""
    if case in ("chunked-up", "slow-upload"):
        assert seen[0]["body"] != ""
    if case == "close-delimited":
        assert client["body"] == "until the end and more"
    if case == "expect-continue":
        assert client["interim"] == [100] and seen[0]["body"] == "hello there"
