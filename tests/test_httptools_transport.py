"""``transport = "httptools"``: what balancekit's own client must get right
beyond the shared proxy suites (which run on it too): keep-alive reuse,
stale connections, interim answers, bodies ended by close, HEAD."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from balancekit._transports.httptools import _Connection
from tests.helpers import balanced
from tests.upstreams import ScriptedUpstream, SocketServer


class CountingUpstream(SocketServer):
    """A keep-alive server answering "ok" to every request, counting the
    connections it accepted."""

    def __init__(self) -> None:
        self.connections = 0
        self.requests = 0
        super().__init__()

    def handle(self, conn: socket.socket) -> None:
        self.connections += 1
        data = b""
        for got in self.chunks(conn):
            data += got
            while b"\r\n\r\n" in data:
                request, _, data = data.partition(b"\r\n\r\n")
                self.requests += 1
                body = b"" if request.startswith(b"HEAD ") else b"ok"
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n" + body)


@pytest.fixture
def counting() -> Iterator[CountingUpstream]:
    upstream = CountingUpstream()
    yield upstream
    upstream.close()


@pytest.fixture
def scripted() -> Iterator[list[ScriptedUpstream]]:
    made: list[ScriptedUpstream] = []
    yield made
    for upstream in made:
        upstream.close()


def test_one_upstream_connection_serves_many_requests(serve, counting) -> None:
    server, balancer = balanced(serve, [counting.url], engine="httptools")
    with httpx.Client(base_url=server.url) as client:
        assert [client.get("/api/x").text for _ in range(20)] == ["ok"] * 20
    assert counting.requests == 20
    assert counting.connections == 1, "kept alive and reused"
    assert balancer.pools["api"].active_requests == 0


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_a_connection_the_backend_closed_is_not_a_failed_request(serve, scripted, method) -> None:
    # The backend answers without "Connection: close" and then closes: a
    # pooled connection is dead by the next request. A GET found dead even
    # after it was written goes again; a POST only when the close was seen
    # first, so its requests wait for the close to arrive (back to back, the
    # close can come after the write: a 502, as NGINX answers it).
    upstream = ScriptedUpstream(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    scripted.append(upstream)
    server, balancer = balanced(serve, [upstream.url], engine="httptools")
    pause = 0.05 if method == "POST" else 0.0
    answers = []
    with httpx.Client(base_url=server.url) as client:
        for _ in range(10):
            answers.append(client.request(method, "/api/x"))
            time.sleep(pause)
    assert [(a.status_code, a.text) for a in answers] == [(200, "ok")] * 10
    assert balancer.pools["api"].backends[0].failures_total == 0


def test_an_interim_100_continue_is_skipped(serve, scripted) -> None:
    upstream = ScriptedUpstream(
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfinal",
        keep_open=True,
    )
    scripted.append(upstream)
    server, _ = balanced(serve, [upstream.url], engine="httptools")
    answer = httpx.post(f"{server.url}/api/x", content=b"data", headers={"expect": "100-continue"})
    assert (answer.status_code, answer.text) == (200, "final"), answer.text


def test_a_body_ended_by_close(serve, scripted) -> None:
    upstream = ScriptedUpstream(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end")
    scripted.append(upstream)
    server, _ = balanced(serve, [upstream.url], engine="httptools")
    for _ in range(3):
        answer = httpx.get(f"{server.url}/api/x")
        assert (answer.status_code, answer.text) == (200, "until the end")


def test_head_answers_have_no_body_and_do_not_poison_the_connection(serve, counting) -> None:
    server, _ = balanced(serve, [counting.url], engine="httptools")
    with httpx.Client(base_url=server.url) as client:
        head = client.head("/api/x")
        assert head.status_code == 200 and head.content == b""
        assert head.headers["content-length"] == "2"
        assert client.get("/api/x").text == "ok"


def test_several_set_cookie_headers_and_odd_header_case(serve, scripted) -> None:
    upstream = ScriptedUpstream(
        b"HTTP/1.1 200 OK\r\nSET-COOKIE: a=1\r\nset-cookie: b=2\r\nX-Odd-Case: yes\r\n"
        b"Content-Length: 2\r\n\r\nok",
        keep_open=True,
    )
    scripted.append(upstream)
    server, _ = balanced(serve, [upstream.url], engine="httptools")
    answer = httpx.get(f"{server.url}/api/x")
    assert answer.headers.get_list("set-cookie") == ["a=1", "b=2"]
    assert answer.headers["x-odd-case"] == "yes"


def test_a_close_the_loop_has_not_seen_yet_is_found_before_a_write() -> None:
    # The peer's FIN is in the kernel but no loop iteration ran: closed is
    # still False, dropped() must say so (what keeps a POST from a dead
    # connection when the close and the next request arrive together).
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def close_the_peer_and_wait() -> None:
        # Plain blocking calls, on purpose: the loop must not run meanwhile.
        peer, _ = listener.accept()
        peer.close()  # the FIN goes out now
        time.sleep(0.1)

    async def main() -> tuple[bool, bool, bool]:
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(
            lambda: _Connection(loop, memoryview(bytearray(1024))), "127.0.0.1", port
        )
        alive = conn.dropped()
        close_the_peer_and_wait()
        seen_closed, dropped = conn.closed, conn.dropped()
        conn.close()
        return alive, seen_closed, dropped

    try:
        alive, seen_closed, dropped = asyncio.run(main())
    finally:
        listener.close()
    assert not alive
    assert not seen_closed and dropped
