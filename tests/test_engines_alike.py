"""The async (ASGI) and sync (WSGI) engines, given the same events, end in
the same outcome: what the client got, each backend's counters and the
metrics. Each scenario runs once per engine; the two summaries must be
equal, and equal to what the contract says."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from balancekit import Balancer
from balancekit.metrics import available as metrics_available
from tests.conftest import closed_port_url, need
from tests.helpers import balanced
from tests.upstreams import make_echo_app

ENGINES = ["aiohttp", "wsgi"]  # the async engine under uvicorn, the sync one under werkzeug

Summary = dict[str, Any]


def settle(balancer: Balancer) -> None:
    """Wait until nothing is in flight (a WSGI server settles a request as
    it closes the response, just after the client has its last byte)."""
    deadline = time.monotonic() + 5
    while balancer.pools["api"].active_requests and time.monotonic() < deadline:
        time.sleep(0.02)


def summary(balancer: Balancer, client: object) -> Summary:
    """What a scenario ended in, with backends by position (their ports
    differ between runs)."""
    settle(balancer)
    assert balancer.metrics is not None
    registry = balancer.metrics.registry
    pool = balancer.pools["api"]
    backends = []
    for backend in pool.backends:
        codes = {}
        for code in ("200", "499", "502", "503", "504"):
            labels = {"pool": "api", "backend": backend.url, "code": code}
            value = registry.get_sample_value("balancekit_requests_total", labels)
            if value:
                codes[code] = int(value)
        backends.append(
            {
                "requests": backend.requests_total,
                "failures": backend.failures_total,
                "active": backend.active_requests,
                "codes": codes,
            }
        )
    retries = registry.get_sample_value("balancekit_retries_total", {"pool": "api"}) or 0
    return {"client": client, "backends": backends, "retries": int(retries)}


def run(serve: Callable[..., Any], engine: str, urls: list[str], **pool: Any) -> Any:
    need(metrics_available(), "prometheus-client is missing")
    return balanced(
        serve,
        urls,
        engine=engine,
        strip_prefix=True,
        pool={"algorithm": "round_robin", **pool},
        status={"enabled": True},
    )


def answered(serve: Callable[..., Any], engine: str, upstream: Any, path: str) -> Summary:
    server, balancer = run(serve, engine, [upstream.url])
    status = httpx.get(f"{server.url}/api{path}").status_code
    return summary(balancer, status)


def refused_then_served(serve: Callable[..., Any], engine: str, upstream: Any) -> Summary:
    server, balancer = run(
        serve, engine, [closed_port_url(), upstream.url], retries={"attempts": 2}
    )
    status = httpx.get(f"{server.url}/api/x").status_code
    return summary(balancer, status)


def none_eligible(serve: Callable[..., Any], engine: str, upstream: Any) -> Summary:
    server, balancer = run(serve, engine, [upstream.url])
    balancer.pools["api"].disable(upstream.url)
    response = httpx.get(f"{server.url}/api/x")
    return summary(balancer, (response.status_code, response.headers.get("retry-after")))


def left_mid_body(serve: Callable[..., Any], engine: str, upstream: Any) -> Summary:
    server, balancer = run(serve, engine, [upstream.url])
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(
            b"POST /api/upload HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" + b"z" * 10
        )
        deadline = time.monotonic() + 5
        while not balancer.pools["api"].active_requests and time.monotonic() < deadline:
            time.sleep(0.01)
    return summary(balancer, "left")


SCENARIOS: dict[str, tuple[Callable[..., Summary], Summary]] = {
    "a 200": (
        lambda serve, engine, up: answered(serve, engine, up, "/x"),
        {"client": 200, "backends": [{"codes": {"200": 1}, "failures": 0}], "retries": 0},
    ),
    "a 503 from the backend": (
        lambda serve, engine, up: answered(serve, engine, up, "/status/503"),
        {"client": 503, "backends": [{"codes": {"503": 1}, "failures": 1}], "retries": 0},
    ),
    "refused, retried elsewhere": (
        refused_then_served,
        {
            "client": 200,
            "backends": [
                {"codes": {"502": 1}, "failures": 1},
                {"codes": {"200": 1}, "failures": 0},
            ],
            "retries": 1,
        },
    ),
    "no backend eligible": (
        none_eligible,
        {"client": (503, "5"), "backends": [{"codes": {}, "failures": 0}], "retries": 0},
    ),
    "the client leaves mid-body": (
        left_mid_body,
        {"client": "left", "backends": [{"codes": {"499": 1}, "failures": 0}], "retries": 0},
    ),
}


@pytest.mark.parametrize("name", SCENARIOS)
def test_both_engines_end_a_scenario_alike(serve, name: str) -> None:
    scenario, expected = SCENARIOS[name]
    upstream = serve(make_echo_app("a"))
    outcomes = {engine: scenario(serve, engine, upstream) for engine in ENGINES}
    assert outcomes["aiohttp"] == outcomes["wsgi"], outcomes
    outcome = outcomes["aiohttp"]
    assert outcome["client"] == expected["client"]
    assert outcome["retries"] == expected["retries"]
    got = [{"codes": b["codes"], "failures": b["failures"]} for b in outcome["backends"]]
    assert got == expected["backends"]
    assert all(b["active"] == 0 for b in outcome["backends"])
