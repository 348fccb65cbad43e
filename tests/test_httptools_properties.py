"""Property tests of ``transport = "httptools"``: generated responses, cut
into generated pieces, sent by a real loopback server to the real client.

- A well-formed response (any status 200-599, any header names, values and
  order, repeated names, a body framed by length, by chunks of any sizes or
  by the connection's end) arrives exactly: status, every header in order,
  every body byte; a kept-alive connection then serves the next request.
- Mangled bytes (a well-formed response with bytes flipped, cut or
  inserted) end in a response or in one of balancekit's errors, never in
  any other exception or a hang.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from hypothesis import HealthCheck, given, settings, strategies as st

from balancekit._backend import Backend
from balancekit._config import TimeoutsConfig
from balancekit._exceptions import ProxyError
from balancekit._transports.httptools import HttptoolsTransport

TIMEOUTS = TimeoutsConfig(connect=2, read=2, write=2)

TOKEN = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_!#$%&'*+.^`|~",
    min_size=1,
    max_size=20,
)
# Header values: visible ASCII and inner spaces, no leading/trailing space
# (a parser strips those, as RFC 9112 says it may).
VALUE = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=40).map(
    lambda v: v.replace(" ", "")
)
FRAMING_NAMES = {"content-length", "transfer-encoding", "connection", "upgrade"}


@dataclass
class Response:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    framing: str  # "length", "chunked" or "close"
    chunk_sizes: list[int]

    def encode(self) -> bytes:
        lines = [f"HTTP/1.1 {self.status} Whatever"]
        lines += [f"{name}: {value}" for name, value in self.headers]
        body = self.body
        if self.framing == "length":
            lines.append(f"Content-Length: {len(body)}")
        elif self.framing == "chunked":
            lines.append("Transfer-Encoding: chunked")
            body = _chunked(body, self.chunk_sizes)
        else:
            lines.append("Connection: close")
        return "\r\n".join([*lines, "", ""]).encode("latin-1") + body

    @property
    def bodiless(self) -> bool:
        return self.status in (204, 304)


def _chunked(body: bytes, sizes: list[int]) -> bytes:
    out, start = [], 0
    for size in sizes or [len(body)]:
        part = body[start : start + size]
        if part:
            out.append(b"%x\r\n%s\r\n" % (len(part), part))
        start += size
    if start < len(body):
        rest = body[start:]
        out.append(b"%x\r\n%s\r\n" % (len(rest), rest))
    return b"".join(out) + b"0\r\n\r\n"


@st.composite
def responses(draw: st.DrawFn) -> Response:
    status = draw(st.integers(200, 599))
    names = st.one_of(TOKEN, st.sampled_from(["Set-Cookie", "X-Dup", "ETag"]))
    headers = draw(
        st.lists(
            st.tuples(names, VALUE).filter(lambda h: h[0].lower() not in FRAMING_NAMES),
            max_size=12,
        )
    )
    framing = draw(st.sampled_from(["length", "chunked", "close"]))
    body = b"" if status in (204, 304) else draw(st.binary(max_size=3000))
    if status in (204, 304):
        framing = "length"
    sizes = draw(st.lists(st.integers(1, 700), max_size=8))
    return Response(status, headers, body, framing, sizes)


def _cuts(data: bytes, points: list[int]) -> list[bytes]:
    points = sorted({p % (len(data) + 1) for p in points})
    pieces, start = [], 0
    for point in points:
        pieces.append(data[start:point])
        start = point
    pieces.append(data[start:])
    return [p for p in pieces if p]


async def _exchange_all(answers: list[list[bytes]], close_after: bool) -> tuple[list, int]:
    """Serve each answer (in its pieces) to one request in turn; return what
    the client made of each, and how many connections it opened."""
    connections = 0
    queue = list(answers)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        try:
            while queue:
                await reader.readuntil(b"\r\n\r\n")
                for piece in queue.pop(0):
                    writer.write(piece)
                    await writer.drain()
                    await asyncio.sleep(0)
                if close_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    backend = Backend(f"http://127.0.0.1:{port}")
    transport = HttptoolsTransport()
    results: list = []
    try:
        for _ in range(len(answers)):
            try:
                response = await transport.send(
                    backend, "GET", "/x", [(b"host", b"h")], None, TIMEOUTS
                )
                body = bytearray()
                while chunk := await response.read():
                    body += chunk
                await response.aclose()
                results.append((response.status, response.headers, bytes(body)))
            except ProxyError as exc:
                results.append(exc)
    finally:
        await transport.aclose()
        server.close()
        await server.wait_closed()
    return results, connections


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(responses(), st.lists(st.integers(0, 10_000), max_size=12))
def test_a_well_formed_response_arrives_exactly(response: Response, cuts: list[int]) -> None:
    data = response.encode()
    second = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nnext"
    keep_alive = response.framing != "close"
    answers = [_cuts(data, cuts), [second]] if keep_alive else [_cuts(data, cuts)]
    results, connections = asyncio.run(_exchange_all(answers, close_after=not keep_alive))
    status, headers, body = results[0]
    assert status == response.status
    expected = [(n.lower().encode(), v.encode()) for n, v in response.headers]
    framing = {b"content-length", b"transfer-encoding", b"connection"}
    assert [h for h in headers if h[0] not in framing] == expected
    assert body == response.body
    if keep_alive:
        assert results[1][2] == b"next"
        assert connections == 1, "the connection is reused after a complete answer"


@st.composite
def mangled(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(responses()).encode())
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "cut", "insert"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[at] = draw(st.integers(0, 255))
        elif kind == "cut":
            del data[at : at + draw(st.integers(1, 40))]
        else:
            data[at:at] = draw(st.binary(min_size=1, max_size=20))
    return bytes(data)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mangled(), st.lists(st.integers(0, 10_000), max_size=6))
def test_mangled_bytes_end_in_an_answer_or_a_proxy_error(data: bytes, cuts: list[int]) -> None:
    results, _ = asyncio.run(
        asyncio.wait_for(_exchange_all([_cuts(data, cuts)], close_after=True), 10)
    )
    (result,) = results
    assert isinstance(result, ProxyError) or 100 <= result[0] <= 999
