"""The PROXY protocol (CONTRACT section 14): the parser on the
specification's examples and on bytes that are not a header, then
``balancekit serve --proxy-protocol`` with real sockets."""

from __future__ import annotations

import json
import socket
import ssl
import struct
import time
from collections.abc import Iterator
from typing import Any

import pytest

from balancekit._proxy_protocol import V2_SIGNATURE, ProxyHeader, ProxyHeaderError, parse
from tests.conftest import free_port
from tests.test_commands import Running, started
from tests.test_serve import certificate  # noqa: F401 (a fixture)


def v2(command: int, family: int, body: bytes) -> bytes:
    return V2_SIGNATURE + bytes([0x20 | command, family]) + struct.pack("!H", len(body)) + body


TCP4 = (
    socket.inet_aton("203.0.113.7") + socket.inet_aton("10.0.0.1") + struct.pack("!HH", 51000, 80)
)
TCP6 = (
    socket.inet_pton(socket.AF_INET6, "2001:db8::7")
    + socket.inet_pton(socket.AF_INET6, "2001:db8::1")
    + struct.pack("!HH", 52000, 443)
)


@pytest.mark.parametrize(
    ("data", "header"),
    [
        (
            b"PROXY TCP4 203.0.113.7 10.0.0.1 51000 80\r\nGET",
            ProxyHeader(42, ("203.0.113.7", 51000)),
        ),
        (
            b"PROXY TCP6 2001:db8::7 2001:db8::1 52000 443\r\n",
            ProxyHeader(46, ("2001:db8::7", 52000)),
        ),
        (b"PROXY UNKNOWN\r\n", ProxyHeader(15, None)),
        (b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n", ProxyHeader(35, None)),
        (v2(1, 0x11, TCP4) + b"GET", ProxyHeader(28, ("203.0.113.7", 51000))),
        (v2(1, 0x21, TCP6), ProxyHeader(52, ("2001:db8::7", 52000))),
        (v2(1, 0x11, TCP4 + b"\x03\x00\x04abcd"), ProxyHeader(35, ("203.0.113.7", 51000))),
        (v2(0, 0x00, b""), ProxyHeader(16, None)),  # LOCAL
    ],
)
def test_headers_of_both_versions_are_read(data: bytes, header: ProxyHeader) -> None:
    assert parse(data) == header
    for cut in range(header.length):  # any prefix is "not yet", never an error
        assert parse(data[:cut]) is None


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\n",
        b"PROXY TCP4 203.0.113.7 10.0.0.1 51000\r\n",
        b"PROXY TCP4 2001:db8::7 10.0.0.1 51000 80\r\n",  # family and address disagree
        b"PROXY TCP4 203.0.113.7 10.0.0.1 051000 80\r\n",
        b"PROXY TCP4 203.0.113.7 10.0.0.1 70000 80\r\n",
        b"PROXY UDP4 203.0.113.7 10.0.0.1 1 2\r\n",
        b"PROXY " + b"x" * 120,  # no end within 107 bytes
        V2_SIGNATURE + bytes([0x31, 0x11]) + struct.pack("!H", 12) + TCP4,  # version 3
        v2(1, 0x12, TCP4),  # UDP
        v2(1, 0x11, TCP4[:6]),  # addresses cut short
        V2_SIGNATURE + bytes([0x21, 0x11]) + struct.pack("!H", 60000),  # far too long
    ],
)
def test_anything_else_is_refused(data: bytes) -> None:
    with pytest.raises(ProxyHeaderError):
        parse(data)


# --- balancekit serve --proxy-protocol ---------------------------------------------------


@pytest.fixture
def proxied(upstreams: list[Any]) -> Iterator[tuple[int, Running]]:
    port = free_port()
    args = ("serve", "--backend", upstreams[0].url, "--port", str(port), "--proxy-protocol")
    with started(*args) as running:
        running.wait_for("serving on")
        yield port, running


def exchange(port: int, *parts: bytes, pause: float = 0.0) -> bytes:
    """Send ``parts`` (``pause`` seconds apart) and read until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=15) as conn:
        for part in parts:
            conn.sendall(part)
            time.sleep(pause)
        received = b""
        while chunk := conn.recv(65536):
            received += chunk
        return received


REQUEST = b"GET /x HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"


def forwarded_for(answer: bytes) -> str:
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), answer[:200]
    if b"transfer-encoding: chunked" in head.lower():
        body = dechunked(body)
    return dict(json.loads(body)["headers"])["x-forwarded-for"]


def dechunked(body: bytes) -> bytes:
    out = b""
    while True:
        size_line, _, rest = body.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return out
        out, body = out + rest[:size], rest[size + 2 :]


def wait_until_open(port: int) -> None:
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            assert time.monotonic() < deadline
            time.sleep(0.05)


def test_the_source_address_becomes_the_client(proxied) -> None:
    port, _ = proxied
    wait_until_open(port)
    v1 = b"PROXY TCP4 203.0.113.7 10.0.0.1 51000 80\r\n"
    assert forwarded_for(exchange(port, v1 + REQUEST)) == "203.0.113.7"
    assert forwarded_for(exchange(port, v2(1, 0x21, TCP6) + REQUEST)) == "2001:db8::7"
    # LOCAL (the balancer's own health check): the connection's address stands.
    assert forwarded_for(exchange(port, v2(0, 0x00, b"") + REQUEST)) == "127.0.0.1"


def test_a_header_that_dribbles_in_is_read_whole(proxied) -> None:
    port, _ = proxied
    wait_until_open(port)
    v1 = b"PROXY TCP4 198.51.100.9 10.0.0.1 40000 80\r\n"
    pieces = [v1[i : i + 5] for i in range(0, len(v1), 5)]
    assert forwarded_for(exchange(port, *pieces, REQUEST, pause=0.02)) == "198.51.100.9"


def test_a_connection_without_a_header_is_closed_unanswered(proxied) -> None:
    port, running = proxied
    wait_until_open(port)
    assert exchange(port, REQUEST) == b""
    assert exchange(port, b"PROXY TCP4 not-an-address 10.0.0.1 1 2\r\n" + REQUEST) == b""
    # and the server goes on serving
    assert forwarded_for(exchange(port, v2(1, 0x11, TCP4) + REQUEST)) == "203.0.113.7"
    assert running.process.poll() is None


@pytest.fixture
def proxied_tls(upstreams: list[Any], request: pytest.FixtureRequest) -> Iterator[tuple[int, str]]:
    files = request.getfixturevalue("certificate")  # test_serve's
    port = free_port()
    args = ("serve", "--backend", upstreams[0].url, "--port", str(port), "--proxy-protocol")
    tls = ("--certfile", files["cert"], "--keyfile", files["key"])
    with started(*args, *tls) as running:
        running.wait_for("serving on")
        wait_until_open(port)
        yield port, files["ca"]


def tls_exchange(port: int, header: bytes, ca: str) -> bytes:
    """``header`` then a TLS session carrying REQUEST; the plaintext answer.
    Through memory BIOs, so the header and the ClientHello leave in one
    write, as an L4 balancer's often do."""
    context = ssl.create_default_context(cafile=ca)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    answer = b""
    with socket.create_connection(("127.0.0.1", port), timeout=15) as conn:
        first, sent = header, False
        while True:
            try:
                if not sent:
                    tls.do_handshake()
                    tls.write(REQUEST)
                    sent = True
                while chunk := tls.read(65536):
                    answer += chunk
                return answer  # b"": the server's close_notify
            except ssl.SSLWantReadError:
                pass
            conn.sendall(first + outgoing.read())
            first = b""
            data = conn.recv(65536)
            if not data:
                return answer
            incoming.write(data)


def test_a_header_before_the_tls_handshake_names_the_client(proxied_tls) -> None:
    port, ca = proxied_tls
    v1 = b"PROXY TCP4 203.0.113.7 10.0.0.1 51000 443\r\n"
    answer = tls_exchange(port, v1, ca)
    assert forwarded_for(answer) == "203.0.113.7"
    assert b'"x-forwarded-proto", "https"' in answer
    assert forwarded_for(tls_exchange(port, v2(1, 0x21, TCP6), ca)) == "2001:db8::7"
    # no header: closed (reset: its bytes were left unread) before any
    # handshake; then still serving
    with pytest.raises(ConnectionResetError):
        exchange(port, b"\x16\x03\x01\x00\x05hello")
    assert forwarded_for(tls_exchange(port, v2(1, 0x11, TCP4), ca)) == "203.0.113.7"


def test_proxy_protocol_is_refused_where_it_cannot_work(upstreams) -> None:
    with started(
        "serve", "--backend", upstreams[0].url, "--port", str(free_port()),
        "--proxy-protocol", "--server", "uvicorn",
    ) as running:  # fmt: skip
        assert running.process.wait(timeout=20) != 0
    assert "--proxy-protocol needs the balancekit server" in "\n".join(running.lines)
