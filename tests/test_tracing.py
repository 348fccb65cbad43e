"""OpenTelemetry spans per try (CONTRACT section 15), exported by the real
SDK to memory: attributes, parents, the traceparent each backend received,
on every engine and on ``serve``'s own server."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

pytest.importorskip("opentelemetry.sdk", reason="the otel extra and opentelemetry-sdk")

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)

from balancekit import Balancer
from balancekit._tracing import ServerSpan
from balancekit.asgi import BalanceMiddleware
from tests.conftest import ENGINES, closed_port_url
from tests.helpers import app_fallback, balanced
from tests.upstreams import make_echo_app

_EXPORTER = InMemorySpanExporter()


@pytest.fixture(scope="session")
def provider() -> TracerProvider:
    """The process's tracer provider (OpenTelemetry allows one per process)."""
    current = trace.get_tracer_provider()
    if isinstance(current, TracerProvider):
        return current
    made = TracerProvider()
    made.add_span_processor(SimpleSpanProcessor(_EXPORTER))
    trace.set_tracer_provider(made)
    return made


@pytest.fixture
def spans(provider: TracerProvider) -> Iterator[InMemorySpanExporter]:
    _EXPORTER.clear()
    yield _EXPORTER
    _EXPORTER.clear()


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def client_spans(exporter: InMemorySpanExporter) -> list[Any]:
    return [s for s in exporter.get_finished_spans() if s.kind == trace.SpanKind.CLIENT]


def traceparent_of(span: Any) -> str:
    ctx = span.get_span_context()
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{ctx.trace_flags:02x}"


def test_each_try_is_a_client_span_whose_context_goes_upstream(serve, engine, spans) -> None:
    upstream = serve(make_echo_app("a"))
    server, _ = balanced(serve, [upstream.url], engine=engine, tracing=True)
    foreign = "00-" + "1" * 32 + "-" + "2" * 16 + "-01"
    response = httpx.get(f"{server.url}/api/x?q=1", headers={"traceparent": foreign}, timeout=10)
    assert response.status_code == 200
    (span,) = client_spans(spans)
    assert span.name == "GET"
    attributes = dict(span.attributes)
    assert attributes == {
        "http.request.method": "GET",
        "server.address": "127.0.0.1",
        "server.port": upstream.port,
        "url.full": f"{upstream.url}/api/x?q=1",
        "balancekit.pool": "api",
        "balancekit.backend": upstream.url,
        "http.response.status_code": 200,
    }
    received = dict(response.json()["headers"])
    assert received["traceparent"] == traceparent_of(span)  # the client's was replaced
    assert span.status.status_code is trace.StatusCode.UNSET


def test_a_retried_get_is_two_spans(serve, engine, spans) -> None:
    upstream = serve(make_echo_app("b"))
    server, _ = balanced(
        serve,
        [closed_port_url(), upstream.url],
        engine=engine,
        pool={"algorithm": "round_robin"},
        tracing=True,
    )
    assert httpx.get(f"{server.url}/api/x", timeout=10).status_code == 200
    failed, served = sorted(client_spans(spans), key=lambda s: s.start_time)
    assert failed.attributes["error.type"] == "UpstreamConnectError"
    assert failed.status.status_code is trace.StatusCode.ERROR
    assert "http.response.status_code" not in failed.attributes
    assert "http.request.resend_count" not in failed.attributes
    assert served.attributes["http.request.resend_count"] == 1
    assert served.attributes["http.response.status_code"] == 200


def test_a_5xx_answer_is_an_error_span(serve, spans) -> None:
    upstream = serve(make_echo_app("a"))
    server, _ = balanced(serve, [upstream.url], engine="httptools", strip_prefix=True, tracing=True)
    assert httpx.get(f"{server.url}/api/status/503", timeout=10).status_code == 503
    (span,) = client_spans(spans)
    assert span.attributes["error.type"] == "503"
    assert span.attributes["http.response.status_code"] == 503


def test_the_tries_are_children_of_the_apps_span(serve, spans) -> None:
    upstream = serve(make_echo_app("a"))
    balancer = Balancer(
        {
            "tracing": True,
            "pools": {"api": {"backends": [upstream.url]}},
            "routes": [{"prefix": "/api/", "pool": "api"}],
        }
    )
    inner = BalanceMiddleware(app_fallback, balancer=balancer)
    tracer = trace.get_tracer("the-app")

    async def app_with_a_span(scope: Any, receive: Any, send: Any) -> None:
        # What OpenTelemetry's ASGI instrumentation does around an app.
        if scope["type"] != "http":
            await inner(scope, receive, send)
            return
        with tracer.start_as_current_span("GET /api", kind=trace.SpanKind.SERVER):
            await inner(scope, receive, send)

    server = serve(app_with_a_span)
    httpx.get(f"{server.url}/api/x", timeout=10)
    (client,) = client_spans(spans)
    (parent,) = [s for s in spans.get_finished_spans() if s.name == "GET /api"]
    assert client.parent is not None and client.parent.span_id == parent.context.span_id


def test_serve_opens_a_server_span_from_the_clients_context(serve, spans) -> None:
    upstream = serve(make_echo_app("a"))
    balancer = Balancer(
        {
            "tracing": True,
            "pools": {"api": {"backends": [upstream.url]}},
            "routes": [{"prefix": "/", "pool": "api"}],
        }
    )
    server = serve(ServerSpan(BalanceMiddleware(app_fallback, balancer=balancer)), lean=True)
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    sent = f"00-{trace_id}-00f067aa0ba902b7-01"
    response = httpx.get(f"{server.url}/x", headers={"traceparent": sent}, timeout=10)
    (client,) = client_spans(spans)
    (server_span,) = [s for s in spans.get_finished_spans() if s.kind == trace.SpanKind.SERVER]
    assert f"{server_span.context.trace_id:032x}" == trace_id
    assert server_span.parent is not None and server_span.parent.span_id == 0x00F067AA0BA902B7
    assert client.parent is not None and client.parent.span_id == server_span.context.span_id
    assert server_span.attributes["http.response.status_code"] == 200
    assert dict(response.json()["headers"])["traceparent"] == traceparent_of(client)


HIDE_OTEL = """
import importlib.abc, sys
class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "opentelemetry" or name.startswith("opentelemetry."):
            raise ModuleNotFoundError(name)
        return None
sys.meta_path.insert(0, Hide())
"""


def run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )


def test_tracing_without_the_extra_is_a_config_error_that_names_it() -> None:
    done = run(
        HIDE_OTEL
        + "from balancekit import ConfigError, load_config\n"
        + "try:\n    load_config({'tracing': True})\n"
        + "except ConfigError as e:\n    print(e.problems[0])\n"
    )
    assert "tracing: needs OpenTelemetry's API" in done.stdout, done.stderr
    assert "otel" in done.stdout


def test_opentelemetry_is_not_imported_unless_tracing_is_on() -> None:
    done = run(
        "import sys\n"
        "from balancekit import Balancer\n"
        "b = Balancer({'pools': {'p': {'backends': ['http://127.0.0.1:9']}},"
        " 'routes': [{'prefix': '/', 'pool': 'p'}]})\n"
        "b.classify('GET', '/x', [(b'host', b't')])\n"
        "print(any(m.startswith('opentelemetry') for m in sys.modules))\n"
    )
    assert done.stdout.strip() == "False", done.stderr


def test_a_flask_proxy_view_traces_its_tries_under_the_apps_span(serve, spans) -> None:
    from flask import Flask

    from balancekit_flask import BalanceKit

    upstream = serve(make_echo_app("a"))
    app = Flask("traced")
    app.config["BALANCEKIT"] = {
        "tracing": True,
        "pools": {"search": {"backends": [upstream.url]}},
    }
    BalanceKit(app).proxy("/search/", pool="search")
    tracer = trace.get_tracer("the-app")
    inner = app.wsgi_app

    def with_a_span(environ: Any, start_response: Any) -> Any:
        # What OpenTelemetry's Flask instrumentation does around a request.
        with tracer.start_as_current_span("GET /search", kind=trace.SpanKind.SERVER):
            return list(inner(environ, start_response))

    app.wsgi_app = with_a_span  # type: ignore[method-assign]
    server = serve(app, wsgi=True)
    response = httpx.get(f"{server.url}/search/q", timeout=10)
    (client,) = client_spans(spans)
    (parent,) = [s for s in spans.get_finished_spans() if s.name == "GET /search"]
    assert client.parent is not None and client.parent.span_id == parent.context.span_id
    assert client.attributes["balancekit.pool"] == "search"
    assert dict(response.json()["headers"])["traceparent"] == traceparent_of(client)
