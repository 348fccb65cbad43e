"""Request ids and the JSON access log (CONTRACT section 15) on every engine.

Each reason flag is produced by the failure it names, against real
upstreams: a closed port, a backend that resets, one that answers late or
with a status in ``on_status``, a pool with nothing eligible or at
``max_connections``, a client that leaves.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.conftest import ENGINES, asgi_only, closed_port_url
from tests.helpers import balanced
from tests.upstreams import answering, make_echo_app

UUID4 = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")
FIELDS = {
    "time", "request_id", "client", "method", "target", "status", "pool", "backend",
    "attempts", "duration_ms", "upstream_ms", "bytes_sent", "flags",
}  # fmt: skip


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def upstream_saw(response: httpx.Response) -> dict[str, str]:
    """The headers the echo upstream received."""
    return dict(response.json()["headers"])


# --- request ids -------------------------------------------------------------------


def test_a_request_id_is_made_sent_upstream_and_returned(serve, engine) -> None:
    server, _ = balanced(serve, [serve(make_echo_app("a")).url], engine=engine)
    response = httpx.get(f"{server.url}/api/x", timeout=10)
    made = response.headers["x-request-id"]
    assert UUID4.fullmatch(made)
    assert upstream_saw(response)["x-request-id"] == made
    again = httpx.get(f"{server.url}/api/x", timeout=10).headers["x-request-id"]
    assert again != made


@pytest.mark.parametrize(
    ("sent", "kept"),
    [
        ("abc-123", True),
        ("~" * 200, True),
        ("x" * 201, False),  # too long
        ("two words", False),  # a space
        ("caf\u00e9", False),  # not ASCII
    ],
)
def test_a_clients_request_id_is_kept_only_when_it_is_sane(serve, sent: str, kept: bool) -> None:
    server, _ = balanced(serve, [serve(make_echo_app("a")).url], engine="httptools")
    raw = sent.encode("utf-8")
    response = httpx.get(f"{server.url}/api/x", headers=[(b"X-Request-ID", raw)], timeout=10)
    returned = response.headers["x-request-id"]
    assert upstream_saw(response)["x-request-id"] == returned
    assert list(upstream_saw(response)).count("x-request-id") == 1
    if kept:
        assert returned == sent
    else:
        assert UUID4.fullmatch(returned)


def test_the_upstreams_own_request_id_is_replaced_and_errors_carry_one(serve, engine) -> None:
    app = answering("a", 200, [(b"x-request-id", b"from-upstream")])
    server, balancer = balanced(serve, [serve(app).url], engine=engine)
    response = httpx.get(f"{server.url}/api/x", headers={"X-Request-ID": "mine"}, timeout=10)
    assert response.headers.get_list("x-request-id") == ["mine"]
    balancer.pools["api"].disable(balancer.pools["api"].backends[0].url)
    refused = httpx.get(f"{server.url}/api/x", headers={"X-Request-ID": "mine"}, timeout=10)
    assert refused.status_code == 503
    assert refused.headers["x-request-id"] == "mine"


def test_request_id_off_adds_nothing(serve, engine) -> None:
    server, _ = balanced(serve, [serve(make_echo_app("a")).url], engine=engine, request_id="")
    response = httpx.get(f"{server.url}/api/x", timeout=10)
    assert "x-request-id" not in response.headers
    assert "x-request-id" not in upstream_saw(response)
    passed = httpx.get(f"{server.url}/api/x", headers={"X-Request-ID": "as is"}, timeout=10)
    assert upstream_saw(passed)["x-request-id"] == "as is"  # an ordinary header now


# --- the JSON access log -----------------------------------------------------------


class Lines:
    """The access log's JSON objects, as handlers see them."""

    def __init__(self, caplog: pytest.LogCaptureFixture) -> None:
        self.caplog = caplog

    def all(self) -> list[dict[str, Any]]:
        return [
            json.loads(r.getMessage()) for r in self.caplog.records if r.name == "balancekit.access"
        ]

    def next(self, count: int = 1) -> list[dict[str, Any]]:
        """Wait for ``count`` lines (written after the answer: a race)."""
        deadline = time.monotonic() + 5
        while len(self.all()) < count:
            assert time.monotonic() < deadline, f"{len(self.all())} access lines, not {count}"
            time.sleep(0.01)
        return self.all()


@pytest.fixture
def lines(caplog: pytest.LogCaptureFixture) -> Lines:
    caplog.set_level(logging.INFO, logger="balancekit.access")
    return Lines(caplog)


def logged(serve: Callable[..., Any], engine: str, urls: list[str], **pool: Any) -> tuple[Any, Any]:
    return balanced(serve, urls, engine=engine, strip_prefix=True, pool=pool, access_log="json")


def test_a_json_line_has_every_field(serve, engine, lines) -> None:
    server, _ = logged(serve, engine, [serve(make_echo_app("a")).url])
    response = httpx.get(f"{server.url}/api/x?q=1", headers={"X-Request-ID": "r-1"}, timeout=10)
    (line,) = lines.next()
    assert set(line) >= FIELDS
    assert line["request_id"] == "r-1"
    assert line["client"] == "127.0.0.1"
    assert (line["method"], line["target"], line["status"]) == ("GET", "/api/x?q=1", 200)
    assert line["pool"] == "api" and line["backend"].startswith("http://127.0.0.1:")
    assert line["attempts"] == 1 and line["flags"] == []
    assert line["bytes_sent"] == len(response.content)
    assert 0 < line["upstream_ms"] <= line["duration_ms"]


def scenario(serve: Callable[..., Any], raw_server: Callable[[str], Any], name: str) -> Any:
    """(backend urls, pool keys, path) of each failure."""
    echo = lambda: serve(make_echo_app("ok")).url  # noqa: E731
    return {
        "UF then served": ([closed_port_url(), echo()], {"algorithm": "round_robin"}, "/x"),
        "UF, URX": ([closed_port_url(), closed_port_url()], {"retries": {"attempts": 2}}, "/x"),
        "UT": ([echo()], {"timeouts": {"read": 0.2}, "retries": {"attempts": 1}}, "/sleep?s=1"),
        "UR": ([raw_server("reset").url], {"retries": {"attempts": 1}}, "/x"),
        "RS": (
            [serve(answering("bad", 503)).url, echo()],
            {"algorithm": "round_robin", "retries": {"on_status": [503]}},
            "/x",
        ),
        "RS, URX": (
            [serve(answering("b1", 503)).url, serve(answering("b2", 503)).url],
            {"retries": {"on_status": [503], "attempts": 2}},
            "/x",
        ),
    }[name]


@pytest.mark.parametrize(
    ("name", "status", "flags", "attempts"),
    [
        ("UF then served", 200, ["UF"], 2),
        ("UF, URX", 502, ["UF", "URX"], 2),
        ("UT", 504, ["UT"], 1),
        ("UR", 502, ["UR"], 1),
        ("RS", 200, ["RS"], 2),
        ("RS, URX", 503, ["RS", "URX"], 2),
    ],
)
def test_each_failure_has_its_flag(
    serve, raw_server, engine, lines, name: str, status: int, flags: list[str], attempts: int
) -> None:
    urls, pool, path = scenario(serve, raw_server, name)
    server, _ = logged(serve, engine, urls, **pool)
    assert httpx.get(f"{server.url}/api{path}", timeout=10).status_code == status
    (line,) = lines.next()
    assert (line["status"], line["flags"], line["attempts"]) == (status, flags, attempts)


def test_no_eligible_backend_is_uh_and_a_full_pool_is_uo(serve, engine, lines) -> None:
    upstream = serve(make_echo_app("a")).url
    server, balancer = logged(serve, engine, [upstream], max_connections=1)
    holder = threading.Thread(target=httpx.get, args=(f"{server.url}/api/sleep?s=0.6",))
    holder.start()
    deadline = time.monotonic() + 5
    while balancer.pools["api"].active_requests < 1:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert httpx.get(f"{server.url}/api/x", timeout=10).status_code == 503
    holder.join()
    balancer.pools["api"].disable(upstream)
    assert httpx.get(f"{server.url}/api/x", timeout=10).status_code == 503
    by_target = {line["target"]: line for line in lines.next(3)}
    assert by_target["/api/sleep?s=0.6"]["flags"] == []
    refused = [line for line in lines.all() if line["status"] == 503]
    assert [line["flags"] for line in refused] == [["UO"], ["UH"]]
    assert all(line["backend"] is None and line["attempts"] == 1 for line in refused)


def test_a_client_that_leaves_is_dc(serve, engine, lines) -> None:
    asgi_only(engine, "a WSGI app cannot notice a client leaving while it waits upstream")
    server, _ = logged(serve, engine, [serve(make_echo_app("a")).url])
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as client:
        client.sendall(b"GET /api/sleep?s=2 HTTP/1.1\r\nHost: t\r\n\r\n")
        time.sleep(0.3)
    (line,) = lines.next()
    assert (line["status"], line["flags"]) == (499, ["DC"])


def test_a_log_handler_that_raises_breaks_no_request(serve, engine, lines) -> None:
    class Broken(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            raise RuntimeError("disk full")

    broken = Broken()
    access = logging.getLogger("balancekit.access")
    access.addHandler(broken)
    try:
        server, _ = logged(serve, engine, [serve(make_echo_app("a")).url])
        for _ in range(3):
            assert httpx.get(f"{server.url}/api/x", timeout=10).status_code == 200
    finally:
        access.removeHandler(broken)


def test_the_text_line_stays_as_it_was(serve, engine, caplog) -> None:
    caplog.set_level(logging.INFO, logger="balancekit.access")
    server, _ = balanced(serve, [serve(make_echo_app("a")).url], engine=engine, access_log=True)
    httpx.get(f"{server.url}/api/x", timeout=10)
    deadline = time.monotonic() + 5
    while not [r for r in caplog.records if r.name == "balancekit.access"]:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    (record,) = [r for r in caplog.records if r.name == "balancekit.access"]
    assert re.fullmatch(
        r'127\.0\.0\.1 "GET /api/x" 200 pool=api backend=http://127\.0\.0\.1:\d+ \d+\.\dms',
        record.getMessage(),
    )
