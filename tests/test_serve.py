"""``balancekit serve`` on its lean server: what a front server owes its
clients, checked against the real command in its own process."""

from __future__ import annotations

import hashlib
import json
import signal
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from balancekit._engine_core import MAX_HEADER_COUNT
from tests.conftest import closed_port_url, free_port
from tests.test_commands import Running, started, wait_until_serving


@pytest.fixture
def balancer(upstreams: list[Any], tmp_path: Path) -> Iterator[tuple[str, Running]]:
    """``balancekit serve`` for a config with a pool of a and b on /api/,
    a pool with no live backend on /down/ and the status page."""
    config = tmp_path / "balancekit.toml"
    config.write_text(
        f'[pools.api]\nbackends = ["{upstreams[0].url}", "{upstreams[1].url}"]\n'
        f'[pools.down]\nbackends = ["{closed_port_url()}"]\n'
        '[[routes]]\nprefix = "/api/"\npool = "api"\nstrip_prefix = true\n'
        '[[routes]]\nprefix = "/down/"\npool = "down"\n'
        "[status]\nenabled = true\n"
    )
    port = free_port()
    with started("serve", str(config), "--port", str(port)) as running:
        running.wait_for("serving on")
        url = f"http://127.0.0.1:{port}"
        wait_until_serving(url)
        yield url, running


def raw(url: str, data: bytes, *, wait: float = 2.0) -> bytes:
    """Send ``data`` on one connection; everything read until close or ``wait``."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(data)
        sock.settimeout(wait)
        got = b""
        try:
            while chunk := sock.recv(65536):
                got += chunk
        except (TimeoutError, ConnectionResetError):
            pass
    return got


def test_proxies_with_keep_alive_and_every_contract_rule(balancer) -> None:
    url, _ = balancer
    with httpx.Client(base_url=url) as client:
        answers = [client.get("/api/users", params={"q": "1"}) for _ in range(4)]
        echoed = answers[0].json()
        assert [a.json()["backend"] for a in answers] == ["a", "b", "a", "b"]
        assert echoed["path"] == "/users" and echoed["query"] == "q=1"
        forwarded = dict(echoed["headers"])
        assert forwarded["x-forwarded-for"] == "127.0.0.1"
        assert forwarded["x-forwarded-proto"] == "http"
        down = client.get("/down/x")
        assert down.status_code == 502
        assert down.headers["content-type"] == "application/problem+json"
        assert client.get("/elsewhere").status_code == 404
        status = client.get("/balancekit/status.json").json()
        assert status["pools"]["api"]["backends"][0]["requests_total"] == 2
        assert "<table" in client.get("/balancekit/").text


def test_bodies_stream_both_ways(balancer) -> None:
    url, _ = balancer
    payload = bytes(range(256)) * 20_000  # 5 MB

    def parts() -> Iterator[bytes]:  # chunked: no Content-Length
        for start in range(0, len(payload), 100_000):
            yield payload[start : start + 100_000]

    echoed = httpx.post(f"{url}/api/upload", content=parts()).json()
    assert echoed["body_size"] == len(payload)
    assert echoed["body_sha256"] == hashlib.sha256(payload).hexdigest()
    with httpx.stream("GET", f"{url}/api/big", params={"mb": "20"}) as big:
        assert sum(len(c) for c in big.iter_bytes()) == 20 * 1024 * 1024
    head = httpx.head(f"{url}/api/x")
    assert head.status_code == 200 and head.content == b""


def test_pipelined_requests_are_answered_in_order(balancer) -> None:
    url, _ = balancer
    requests = (
        b"".join(f"GET /api/p{i} HTTP/1.1\r\nHost: x\r\n\r\n".encode() for i in range(5))
        + b"GET /api/last HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    got = raw(url, requests)
    assert got.count(b"HTTP/1.1 200 OK") == 6
    paths = [json.loads(line)["path"] for line in _bodies(got)]
    assert paths == [f"/p{i}" for i in range(5)] + ["/last"]


def test_a_connection_closes_after_its_thousandth_request(balancer) -> None:
    url, _ = balancer
    from balancekit._server import KEEP_ALIVE_REQUESTS

    one = b"GET /balancekit/status.json HTTP/1.1\r\nHost: t\r\n\r\n"
    got = raw(url, one * (KEEP_ALIVE_REQUESTS + 5), wait=20)
    heads = got.split(b"HTTP/1.1 ")[1:]
    assert len(heads) == KEEP_ALIVE_REQUESTS  # then closed: the client sends the rest again
    assert b"connection: close" in heads[-1].lower()
    assert not any(b"connection: close" in head.lower() for head in heads[:-1])


def _bodies(stream: bytes) -> list[bytes]:
    # The echo answers are chunked: each body is one chunk.
    out = []
    for part in stream.split(b"\r\n\r\n")[1:]:
        size, _, rest = part.partition(b"\r\n")
        if size and size != b"0" and rest.startswith(b"{"):
            out.append(rest[: int(size, 16)])
    return out


@pytest.mark.parametrize(
    ("head", "status"),
    [
        pytest.param(
            "".join(f"X-H{i}: v\r\n" for i in range(MAX_HEADER_COUNT + 1)), 431, id="too-many"
        ),
        pytest.param("X-Big: " + "v" * 70_000 + "\r\n", 431, id="too-large"),
        pytest.param("Bad Header Line\r\n", 400, id="malformed"),
    ],
)
def test_bad_request_heads_are_refused_and_the_connection_closed(
    balancer, head: str, status: int
) -> None:
    url, _ = balancer
    got = raw(url, f"GET /api/x HTTP/1.1\r\nHost: x\r\n{head}\r\n".encode())
    assert got.startswith(f"HTTP/1.1 {status} ".encode()), got[:200]
    assert b"application/problem+json" in got
    # And the server goes on serving.
    assert httpx.get(f"{url}/api/x").status_code == 200


def test_a_client_that_leaves_releases_its_request(balancer, upstreams) -> None:
    # The upstream answers only once the proxy goes away: the request is
    # released because serve noticed the client leave, not because it ended.
    url, _ = balancer
    raw(url, b"GET /api/slow-headers HTTP/1.1\r\nHost: x\r\n\r\n", wait=0.3)
    deadline = time.monotonic() + 3
    while True:
        pools = httpx.get(f"{url}/balancekit/status.json").json()["pools"]
        cancelled = upstreams[0].app.cancelled + upstreams[1].app.cancelled
        if pools["api"]["active_requests"] == 0 and cancelled == ["/slow-headers"]:
            break
        assert time.monotonic() < deadline, (pools["api"], cancelled)
        time.sleep(0.05)


def test_sigterm_lets_in_flight_requests_finish(balancer) -> None:
    url, running = balancer
    result: dict[str, Any] = {}

    def slow() -> None:
        result["answer"] = httpx.get(f"{url}/api/sleep", params={"s": "1"}, timeout=10)

    client = threading.Thread(target=slow)
    client.start()
    time.sleep(0.3)  # the request is in flight
    started_at = time.monotonic()
    assert running.stop(signal.SIGTERM) == 0
    client.join(timeout=10)
    assert result["answer"].status_code == 200
    assert result["answer"].headers["connection"] == "close"
    assert time.monotonic() - started_at < 5
    with pytest.raises(httpx.ConnectError):
        httpx.get(url)


def test_websocket_upgrades_are_proxied(balancer) -> None:
    from websockets.sync.client import connect

    url, _ = balancer
    with connect(url.replace("http", "ws") + "/api/ws") as ws:
        ws.send("hello")
        assert "hello" in str(ws.recv(timeout=5))


def test_absolute_form_targets_and_queries_reach_the_backend(balancer) -> None:
    url, _ = balancer
    for target in ("/api/q?a=1&b=%20", "http://example.test/api/q?a=1&b=%20"):
        got = raw(url, f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        (body,) = _bodies(got)
        echoed = json.loads(body)
        assert (echoed["path"], echoed["query"]) == ("/q", "a=1&b=%20"), target


def test_expect_100_continue_is_answered_before_the_body(balancer) -> None:
    url, _ = balancer
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.settimeout(2)  # curl waits 1 s for the 100 before sending anyway
        sock.sendall(
            b"POST /api/up HTTP/1.1\r\nHost: x\r\nExpect: 100-Continue\r\n"
            b"Content-Length: 5\r\nConnection: close\r\n\r\n"
        )
        assert sock.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(b"hello")
        got = b""
        while chunk := sock.recv(65536):
            got += chunk
    (body,) = _bodies(got)
    assert json.loads(body)["body_size"] == 5


@pytest.mark.parametrize("form", ["json", "text"])
def test_the_access_log_is_printed_on_standard_output(upstreams, tmp_path, form: str) -> None:
    config = tmp_path / "balancekit.toml"
    access_log = '"json"' if form == "json" else "true"
    config.write_text(
        f"access_log = {access_log}\n"
        f'[pools.api]\nbackends = ["{upstreams[0].url}"]\n'
        '[[routes]]\nprefix = "/"\npool = "api"\n'
    )
    port = free_port()
    with started("serve", str(config), "--port", str(port)) as running:
        running.wait_for("serving on")
        url = f"http://127.0.0.1:{port}"
        wait_until_serving(url)
        sent = httpx.get(f"{url}/logged", headers={"X-Request-ID": "seen-1"}, timeout=10)
        assert sent.headers["x-request-id"] == "seen-1"
        line = running.wait_for("/logged")
    if form == "json":
        record = json.loads(line)
        assert (record["request_id"], record["target"], record["status"]) == (
            "seen-1",
            "/logged",
            200,
        )
    else:
        assert '"GET /logged" 200 pool=api' in line


@pytest.mark.parametrize("server", ["balancekit", "uvicorn"])
def test_sighup_reloads_the_file_and_a_bad_one_changes_nothing(upstreams, tmp_path, server) -> None:
    config = tmp_path / "balancekit.toml"

    def pointing_at(upstream: Any) -> str:
        return (
            f'[pools.api]\nbackends = ["{upstream.url}"]\n[[routes]]\nprefix = "/"\npool = "api"\n'
        )

    config.write_text(pointing_at(upstreams[0]))
    port = free_port()
    with started("serve", str(config), "--port", str(port), "--server", server) as running:
        running.wait_for("serving on")
        url = f"http://127.0.0.1:{port}"
        wait_until_serving(url)
        with httpx.Client(timeout=10) as client:  # one kept-alive connection throughout
            assert client.get(f"{url}/x").json()["backend"] == "a"
            config.write_text(pointing_at(upstreams[1]))
            running.process.send_signal(signal.SIGHUP)
            running.wait_for("configuration reloaded")
            assert client.get(f"{url}/x").json()["backend"] == "b"
            config.write_text('[[routes]]\nprefix = "/"\npool = "gone"\n')
            running.process.send_signal(signal.SIGHUP)
            running.wait_for("the running configuration stays")
            assert client.get(f"{url}/x").json()["backend"] == "b"
        assert running.stop(signal.SIGTERM) == 0


@pytest.fixture
def certificate(tmp_path: Path) -> dict[str, str]:
    """A throwaway CA and a certificate for 127.0.0.1 it signed, as files."""
    trustme = pytest.importorskip("trustme", reason="trustme makes the test certificates")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    files = {name: str(tmp_path / f"{name}.pem") for name in ("ca", "cert", "key", "other")}
    ca.cert_pem.write_to_path(files["ca"])
    cert.cert_chain_pems[0].write_to_path(files["cert"])
    cert.private_key_pem.write_to_path(files["key"])
    ca.issue_cert("127.0.0.1").private_key_pem.write_to_path(files["other"])
    return files


@pytest.mark.parametrize("server", ["balancekit", "uvicorn"])
def test_tls_at_the_edge(upstreams, certificate, server) -> None:
    port = free_port()
    args = ["--backend", upstreams[0].url, "--port", str(port), "--server", server]
    tls = ["--certfile", certificate["cert"], "--keyfile", certificate["key"]]
    with started("serve", *args, *tls) as running:
        assert running.wait_for("serving on").split()[3] == f"https://127.0.0.1:{port}/"
        url = f"https://127.0.0.1:{port}"
        deadline = time.monotonic() + 10
        trusted = ssl.create_default_context(cafile=certificate["ca"])
        with httpx.Client(verify=trusted, timeout=10) as client:
            while True:
                try:
                    response = client.get(f"{url}/x")
                    break
                except httpx.ConnectError:
                    assert time.monotonic() < deadline
                    time.sleep(0.05)
            assert response.status_code == 200
            assert response.http_version == "HTTP/1.1"
            assert dict(response.json()["headers"])["x-forwarded-proto"] == "https"
            # A handshake that never starts holds no one up, and plain HTTP
            # on the TLS port gets nowhere.
            with socket.create_connection(("127.0.0.1", port)):
                assert client.get(f"{url}/x").status_code == 200
                with pytest.raises(httpx.HTTPError):
                    httpx.get(f"http://127.0.0.1:{port}/x", timeout=5)
                assert client.get(f"{url}/x").status_code == 200
        assert running.stop(signal.SIGTERM) == 0


def test_a_key_that_is_not_the_certificates_fails_at_start_up(upstreams, certificate) -> None:
    with started(
        "serve", "--backend", upstreams[0].url, "--port", str(free_port()),
        "--certfile", certificate["cert"], "--keyfile", certificate["other"],
    ) as running:  # fmt: skip
        assert running.process.wait(timeout=20) != 0
    assert "--certfile/--keyfile" in "\n".join(running.lines)


def test_the_serve_table_sets_what_flags_do_not(upstreams, certificate, tmp_path) -> None:
    from_table, from_flag = free_port(), free_port()
    config = tmp_path / "balancekit.toml"
    config.write_text(
        f'[serve]\nport = {from_table}\ncertfile = "cert.pem"\nkeyfile = "key.pem"\n'
        f'[pools.api]\nbackends = ["{upstreams[0].url}"]\n'
        '[[routes]]\nprefix = "/"\npool = "api"\n'
    )  # the certificate files sit beside the configuration: relative paths
    with started("serve", str(config)) as running:
        assert f"https://127.0.0.1:{from_table}/" in running.wait_for("serving on")
    with started("serve", str(config), "--port", str(from_flag)) as running:
        assert f"https://127.0.0.1:{from_flag}/" in running.wait_for("serving on")
    config.write_text(config.read_text().replace("[serve]\n", "[serve]\nworkers = 2\n"))
    with started("serve", str(config)) as running:
        assert running.process.wait(timeout=20) != 0
    assert "[serve] workers = 2 needs a shared store" in "\n".join(running.lines)
