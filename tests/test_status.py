"""The status path: status.json, the HTML page, and its guards."""

from __future__ import annotations

import httpx
import pytest

from tests.helpers import balanced


def test_status_json_and_page(serve, upstreams) -> None:
    server, _ = balanced(serve, [u.url for u in upstreams], status={"enabled": True})
    for _ in range(3):
        assert httpx.get(f"{server.url}/api/x").status_code == 200
    status = httpx.get(f"{server.url}/balancekit/status.json").json()
    backends = status["pools"]["api"]["backends"]
    assert status["pools"]["api"]["algorithm"] == "round_robin"
    assert [b["url"] for b in backends] == [u.url for u in upstreams]
    assert [b["requests_total"] for b in backends] == [1, 1, 1]
    assert {b["state"] for b in backends} == {"healthy"}
    page = httpx.get(f"{server.url}/balancekit/")
    assert page.headers["content-type"].startswith("text/html")
    assert upstreams[0].url in page.text and "healthy" in page.text
    assert httpx.get(f"{server.url}/balancekit/nope").status_code == 404


def test_disabled_status_path_is_an_ordinary_path(serve, upstreams) -> None:
    server, _ = balanced(serve, [upstreams[0].url], prefix="/")
    echoed = httpx.get(f"{server.url}/balancekit/status.json").json()
    assert echoed["path"] == "/balancekit/status.json"


@pytest.mark.parametrize(
    ("headers", "query", "allowed"),
    [
        pytest.param({}, "", False, id="none"),
        pytest.param({"Authorization": "Bearer s3cret"}, "", True, id="bearer"),
        pytest.param({"Authorization": "Bearer wrong"}, "", False, id="wrong-bearer"),
        pytest.param({}, "?token=s3cret", True, id="query"),
        pytest.param({}, "?token=s3cre", False, id="wrong-query"),
    ],
)
def test_token(serve, upstreams, headers, query, allowed) -> None:
    server, _ = balanced(serve, [upstreams[0].url], status={"enabled": True, "token": "s3cret"})
    response = httpx.get(f"{server.url}/balancekit/status.json{query}", headers=headers)
    assert response.status_code == (200 if allowed else 403)
    if not allowed:
        assert "127.0.0.1" not in response.text


@pytest.mark.parametrize(
    ("allow", "allowed"),
    [
        pytest.param(["127.0.0.0/8"], True, id="inside"),
        pytest.param(["10.0.0.0/8"], False, id="outside"),
    ],
)
def test_allow_cidrs(serve, upstreams, allow, allowed) -> None:
    server, _ = balanced(serve, [upstreams[0].url], status={"enabled": True, "allow": allow})
    response = httpx.get(f"{server.url}/balancekit/status.json")
    assert response.status_code == (200 if allowed else 403)


def test_custom_status_path(serve, upstreams) -> None:
    server, _ = balanced(serve, [upstreams[0].url], status={"enabled": True, "path": "/ops"})
    assert httpx.get(f"{server.url}/ops/status.json").status_code == 200
    assert httpx.get(f"{server.url}/ops").status_code == 200
