"""balancekit.load_report: the backend side of a Prequal probe, on real
servers (uvicorn for ASGI, werkzeug's threaded server for WSGI, Django's
handlers under both and its test client)."""

from __future__ import annotations

import asyncio
import inspect
import json
import socket
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from django.core.handlers.asgi import ASGIHandler
from django.core.handlers.wsgi import WSGIHandler
from django.test import Client, override_settings
from websockets.sync.client import connect

from balancekit import ConfigError
from balancekit.load_report import (
    DEFAULT_PATH,
    ASGILoadReportMiddleware,
    LoadReportMiddleware,
    LoadTracker,
    WSGILoadReportMiddleware,
)
from balancekit_django.middleware import LoadReportMiddleware as DjangoLoadReportMiddleware
from tests.load_report_apps import DJANGO_GATE, Gate, make_asgi_app, make_wsgi_app

DJANGO_ONLY = override_settings(
    MIDDLEWARE=["balancekit_django.middleware.LoadReportMiddleware"],
    ROOT_URLCONF="tests.load_report_apps",
)


def probe(base: str) -> dict[str, Any]:
    response = httpx.get(base + DEFAULT_PATH, timeout=5)
    assert response.status_code == 200
    report: dict[str, Any] = response.json()
    return report


def wait_for(base: str, in_flight: int, timeout: float = 5.0) -> dict[str, Any]:
    """Probe until the report shows ``in_flight``; the last report."""
    deadline = time.monotonic() + timeout
    while True:
        report = probe(base)
        if report["in_flight"] == in_flight or time.monotonic() > deadline:
            assert report["in_flight"] == in_flight, report
            return report
        time.sleep(0.01)


@pytest.fixture
def gate() -> Iterator[Gate]:
    made = Gate()
    yield made
    made.open.set()  # nothing stays held when a test fails


@dataclass
class Served:
    """A server running one form of the middleware, and its app's gate."""

    url: str
    port: int
    gate: Gate
    hold: str = "/hold"  # the held endpoint: Django's async view under ASGI


@pytest.fixture
def asgi_server(serve, gate) -> Served:
    server = serve(LoadReportMiddleware(make_asgi_app(gate)))
    return Served(server.url, server.port, gate)


@pytest.fixture
def wsgi_server(serve, gate) -> Served:
    server = serve(LoadReportMiddleware(make_wsgi_app(gate)), wsgi=True)
    return Served(server.url, server.port, gate)


@pytest.fixture
def django_gate() -> Iterator[Gate]:
    DJANGO_GATE.reset()
    yield DJANGO_GATE
    DJANGO_GATE.open.set()


@pytest.fixture
def django_wsgi(serve, django_gate) -> Iterator[Served]:
    with DJANGO_ONLY:
        server = serve(WSGIHandler(), wsgi=True)  # the middleware is loaded here
        yield Served(server.url, server.port, django_gate)


@pytest.fixture
def django_asgi(serve, django_gate) -> Iterator[Served]:
    with DJANGO_ONLY:
        server = serve(ASGIHandler(), lifespan="off")
        yield Served(server.url, server.port, django_gate, "/ahold")


@pytest.fixture(params=["asgi", "wsgi", "django-wsgi", "django-asgi"])
def server(request: pytest.FixtureRequest) -> Served:
    """Each form of the middleware under a real server."""
    name = {"asgi": "asgi_server", "wsgi": "wsgi_server"}.get(request.param)
    served: Served = request.getfixturevalue(name or request.param.replace("-", "_"))
    return served


# The form chosen


def test_an_async_app_gets_the_asgi_form_and_anything_else_the_wsgi_form(gate) -> None:
    from flask import Flask
    from starlette.applications import Starlette

    asgi = LoadReportMiddleware(make_asgi_app(gate))
    assert type(asgi) is ASGILoadReportMiddleware
    assert inspect.iscoroutinefunction(asgi.__call__)
    assert type(LoadReportMiddleware(Starlette())) is ASGILoadReportMiddleware
    assert type(LoadReportMiddleware(ASGIHandler())) is ASGILoadReportMiddleware
    wsgi = LoadReportMiddleware(make_wsgi_app(gate))
    assert type(wsgi) is WSGILoadReportMiddleware
    assert not inspect.iscoroutinefunction(wsgi.__call__)
    flask = Flask(__name__)
    assert type(LoadReportMiddleware(flask.wsgi_app)) is WSGILoadReportMiddleware
    assert type(LoadReportMiddleware(flask)) is WSGILoadReportMiddleware
    assert isinstance(asgi, LoadReportMiddleware)
    assert isinstance(wsgi, LoadReportMiddleware)
    assert type(ASGILoadReportMiddleware(make_asgi_app(gate))) is ASGILoadReportMiddleware


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="asgiref marks for inspect from 3.12")
def test_a_function_marked_by_asgiref_is_asgi(gate) -> None:
    from asgiref.sync import markcoroutinefunction

    class Wrapper:
        def __init__(self) -> None:
            markcoroutinefunction(self)

        def __call__(self, scope: Any, receive: Any, send: Any) -> Any:
            return make_asgi_app(gate)(scope, receive, send)

    assert type(LoadReportMiddleware(Wrapper())) is ASGILoadReportMiddleware


@pytest.mark.parametrize(
    ("options", "message"),
    [
        pytest.param({"alpha": 0}, "alpha: must be a number in (0, 1], got 0", id="alpha-zero"),
        pytest.param({"alpha": 1.5}, "alpha: must be a number in (0, 1], got 1.5", id="alpha-big"),
        pytest.param({"alpha": "0.1"}, "got '0.1'", id="alpha-text"),
        pytest.param({"alpha": True}, "got True", id="alpha-bool"),
        pytest.param({"path": "load"}, "path: must be a path starting with '/'", id="path"),
    ],
)
def test_bad_options_are_config_errors(gate, options, message) -> None:
    with pytest.raises(ConfigError) as caught:
        LoadReportMiddleware(make_asgi_app(gate), **options)
    assert message in str(caught.value)


# The probe itself


def test_the_probe_answers_json_and_is_not_counted(server) -> None:
    response = httpx.get(server.url + DEFAULT_PATH)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.headers["cache-control"] == "no-store"
    assert json.loads(response.content) == {"in_flight": 0, "latency_ms": 0.0}
    assert isinstance(response.json()["latency_ms"], float), "a number before any sample"
    assert probe(server.url)["in_flight"] == 0, "probes do not count themselves"
    assert probe(server.url)["latency_ms"] == 0.0, "nor are they latency samples"


def test_head_answers_the_headers_only(server) -> None:
    get = httpx.get(server.url + DEFAULT_PATH)
    head = httpx.head(server.url + DEFAULT_PATH)
    assert head.status_code == 200
    assert head.content == b""
    assert head.headers["content-type"] == "application/json"
    assert head.headers["content-length"] == get.headers["content-length"]


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE"], ids=str.lower)
def test_other_methods_are_405_with_allow(server, method) -> None:
    response = httpx.request(method, server.url + DEFAULT_PATH, content=b"x")
    assert response.status_code == 405
    assert response.headers["allow"] == "GET, HEAD"
    assert probe(server.url)["in_flight"] == 0


def test_a_custom_path(serve, gate) -> None:
    server = serve(LoadReportMiddleware(make_asgi_app(gate), path="/load"))
    assert httpx.get(server.url + "/load").json() == {"in_flight": 0, "latency_ms": 0.0}
    assert httpx.get(server.url + DEFAULT_PATH).content == b"ok", "the app's own"


# Counting


def test_in_flight_rises_with_held_requests_and_falls_back_to_zero(server) -> None:
    held = 5
    with ThreadPoolExecutor(held) as pool:
        answers = [
            pool.submit(httpx.get, server.url + server.hold, timeout=15) for _ in range(held)
        ]
        wait_for(server.url, held)
        server.gate.open.set()
        assert [a.result().status_code for a in answers] == [200] * held
    wait_for(server.url, 0)


def test_latency_moves_toward_a_slow_endpoints(server) -> None:
    with httpx.Client(base_url=server.url) as client:
        for _ in range(5):
            client.get("/fast")
        fast = probe(server.url)["latency_ms"]
        assert 0 < fast < 20
        seen = [fast]
        for _ in range(3):
            for _ in range(5):
                client.get("/slow?ms=100")
            seen.append(probe(server.url)["latency_ms"])
    assert seen == sorted(seen), f"rising toward 100 ms: {seen}"
    # 15 samples of ~100 ms at alpha 0.1: 1 - 0.9**15 = 79% of the way.
    assert 65 < seen[-1] < 130, seen


@pytest.mark.parametrize(
    ("where", "status"), [("/raise", 500), ("/unavailable", 503)], ids=["raises", "503"]
)
def test_a_failure_counts_out_and_does_not_look_fast(server, where, status) -> None:
    with httpx.Client(base_url=server.url) as client:
        client.get("/slow?ms=200")
        before = probe(server.url)["latency_ms"]
        for _ in range(3):
            assert client.get(where).status_code == status
    after = probe(server.url)
    assert after["in_flight"] == 0
    assert after["latency_ms"] >= before, "failures, faster than 200 ms, never lower it"


def test_many_threads_leave_in_flight_at_exactly_zero(server) -> None:
    threads, each = 16, 20
    seen: list[int] = []

    def client() -> None:
        with httpx.Client(base_url=server.url, timeout=15) as http:
            for i in range(each):
                http.get("/fast" if i % 2 else "/slow?ms=2")

    def watch(stop: threading.Event) -> None:
        while not stop.is_set():
            seen.append(probe(server.url)["in_flight"])

    stop = threading.Event()
    watcher = threading.Thread(target=watch, args=(stop,))
    watcher.start()
    with ThreadPoolExecutor(threads) as pool:
        for future in [pool.submit(client) for _ in range(threads)]:
            future.result()
    stop.set()
    watcher.join()
    assert probe(server.url)["in_flight"] == 0
    assert all(0 <= n <= threads for n in seen), seen


# The docs' recipes


def test_fastapi_add_middleware(serve) -> None:
    from fastapi import FastAPI

    app = FastAPI()

    @app.get("/items")
    async def items() -> list[int]:
        await asyncio.sleep(0.02)
        return [1, 2]

    app.add_middleware(LoadReportMiddleware)
    server = serve(app)
    assert httpx.get(server.url + "/items").json() == [1, 2]
    report = probe(server.url)
    assert report["in_flight"] == 0 and report["latency_ms"] >= 20


def test_flask_wsgi_app(serve) -> None:
    from flask import Flask

    app = Flask(__name__)
    app.add_url_rule("/items", "items", lambda: {"items": [1, 2]})
    app.wsgi_app = LoadReportMiddleware(app.wsgi_app)  # type: ignore[method-assign]
    server = serve(app, wsgi=True)
    assert httpx.get(server.url + "/items").json() == {"items": [1, 2]}
    report = probe(server.url)
    assert report["in_flight"] == 0 and report["latency_ms"] > 0


# ASGI


def test_asgi_lifespan_and_websockets_pass_through_uncounted(asgi_server) -> None:
    assert asgi_server.gate.lifespan == ["startup"]
    ws_url = asgi_server.url.replace("http", "ws") + "/ws"
    with connect(ws_url, open_timeout=5) as ws:
        ws.send("hello")
        assert ws.recv(timeout=5) == "hello"
        assert probe(asgi_server.url)["in_flight"] == 0, "websockets are not counted"


def test_asgi_counts_until_the_response_is_complete_not_the_apps_return() -> None:
    tracker_seen: list[int] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"a", "more_body": True})
        tracker_seen.append(middleware.tracker.in_flight)
        await send({"type": "http.response.body", "body": b"b"})
        tracker_seen.append(middleware.tracker.in_flight)  # a background task's time

    middleware = LoadReportMiddleware(app)

    async def send(message: Any) -> None:
        pass

    scope = {"type": "http", "path": "/", "method": "GET"}
    asyncio.run(middleware(scope, None, send))  # type: ignore[arg-type]
    assert tracker_seen == [1, 0]
    assert middleware.tracker.in_flight == 0


def test_an_asgi_response_cut_off_by_the_client_counts_out(asgi_server) -> None:
    with socket.create_connection(("127.0.0.1", asgi_server.port)) as sock:
        sock.sendall(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(65536)
        wait_for(asgi_server.url, 1)
    wait_for(asgi_server.url, 0)
    assert asgi_server.gate.cut == ["asgi"], "the app saw the disconnect, before its last chunk"


# WSGI


def test_a_wsgi_response_closed_early_counts_out(wsgi_server) -> None:
    with socket.create_connection(("127.0.0.1", wsgi_server.port)) as sock:
        sock.sendall(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(65536)
        wait_for(wsgi_server.url, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    wait_for(wsgi_server.url, 0)  # the stream alone would take 2 s more
    assert wsgi_server.gate.cut == ["wsgi"]


def test_a_wsgi_iterable_closed_early_in_process_counts_out_once(gate) -> None:
    middleware = LoadReportMiddleware(make_wsgi_app(gate))
    environ = {"PATH_INFO": "/stream", "REQUEST_METHOD": "GET"}
    response = middleware(environ, lambda status, headers, exc_info=None: None)
    chunks = iter(response)
    assert next(chunks) == b"x" * 1024
    assert middleware.tracker.in_flight == 1
    response.close()
    response.close()
    assert middleware.tracker.in_flight == 0, "counted out once"
    assert gate.cut == ["wsgi"], "the app's own iterable was closed"


def test_wsgi_threads_hammering_in_process_leave_exactly_zero(gate) -> None:
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as the interpreter lets it
    try:
        middleware = LoadReportMiddleware(make_wsgi_app(gate))
        environ = {"PATH_INFO": "/fast", "REQUEST_METHOD": "GET"}

        def call(_: int) -> None:
            for _ in range(2000):
                response = middleware(dict(environ), lambda *args: None)
                b"".join(response)
                response.close()

        with ThreadPoolExecutor(16) as pool:
            list(pool.map(call, range(16)))
    finally:
        sys.setswitchinterval(old)
    assert middleware.tracker.in_flight == 0
    assert middleware.tracker.latency_ms is not None


def test_the_tracker_alone() -> None:
    tracker = LoadTracker(alpha=0.5)
    assert tracker.report() == b'{"in_flight": 0, "latency_ms": 0.0}'
    first = tracker.begin()
    second = tracker.begin()
    assert json.loads(tracker.report())["in_flight"] == 2
    tracker.end(first - 0.010)  # 10 ms more than it took: the first sample is taken whole
    assert tracker.latency_ms is not None and 10 <= tracker.latency_ms < 20
    taken = tracker.latency_ms
    tracker.end(second, failed=True)  # fast and failed: the average stays
    assert tracker.latency_ms == taken and tracker.in_flight == 0
    third = tracker.begin()
    tracker.end(third - 0.100, failed=True)  # slow and failed: it rises
    assert tracker.latency_ms > taken


# Django


@pytest.fixture
def django_client(django_gate) -> Iterator[Client]:
    with DJANGO_ONLY:
        yield Client(raise_request_exception=False)


# Closing a response by hand sends request_finished, whose receiver checks the
# database connection (the test client disconnects it for what it closes itself).
@pytest.mark.django_db
def test_django_test_client_counts_a_streamed_response_until_it_is_read(django_client) -> None:
    streams = [django_client.get("/stream") for _ in range(2)]
    report = django_client.get(DEFAULT_PATH)
    assert report["Content-Type"] == "application/json"
    assert report["Cache-Control"] == "no-store"
    assert json.loads(report.content) == {"in_flight": 2, "latency_ms": 0.0}
    assert b"".join(streams[0].streaming_content) == b"abc"
    assert django_client.get(DEFAULT_PATH).json()["in_flight"] == 1
    streams[1].close()
    assert django_client.get(DEFAULT_PATH).json()["in_flight"] == 0


def test_django_test_client_probe_head_405_and_a_failing_view(django_client) -> None:
    head = django_client.head(DEFAULT_PATH)
    assert head.status_code == 200 and head.content == b""
    post = django_client.post(DEFAULT_PATH)
    assert post.status_code == 405 and post["Allow"] == "GET, HEAD"
    assert django_client.get("/slow?ms=30").status_code == 200
    assert django_client.get(DEFAULT_PATH).json()["latency_ms"] >= 30, "the first sample, whole"
    assert django_client.get("/raise").status_code == 500
    report = django_client.get(DEFAULT_PATH).json()
    assert report["in_flight"] == 0
    assert report["latency_ms"] >= 30, "a fast failure does not lower it"


def test_the_django_middleware_subclassed_for_another_path(django_gate) -> None:
    with override_settings(
        MIDDLEWARE=["tests.test_load_report.ElsewhereLoadReport"],
        ROOT_URLCONF="tests.load_report_apps",
    ):
        client = Client()
        assert client.get("/load").json() == {"in_flight": 0, "latency_ms": 0.0}
        assert client.get(DEFAULT_PATH).status_code == 404


class ElsewhereLoadReport(DjangoLoadReportMiddleware):
    path = "/load"
    alpha = 0.5


def test_the_django_middleware_is_sync_and_async_capable() -> None:
    from asgiref.sync import iscoroutinefunction

    assert DjangoLoadReportMiddleware.sync_capable and DjangoLoadReportMiddleware.async_capable

    async def view(request: Any) -> Any: ...

    assert iscoroutinefunction(DjangoLoadReportMiddleware(view))
    assert not iscoroutinefunction(DjangoLoadReportMiddleware(lambda request: None))
