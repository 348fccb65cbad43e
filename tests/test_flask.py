"""balancekit_flask with real Flask apps under werkzeug, real backends."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
from flask import Blueprint, Flask, abort, g, request

from balancekit import Balancer, ConfigError
from balancekit.asgi import BalanceMiddleware as ASGIBalanceMiddleware
from balancekit.wsgi import BalanceMiddleware
from balancekit_flask import BalanceKit
from tests.conftest import closed_port_url
from tests.helpers import app_fallback


def flask_app(**config) -> Flask:
    app = Flask("balancekit_test")
    app.config.update(config)

    @app.get("/")
    def home() -> str:
        return "flask home"

    @app.get("/search/local")
    def not_proxied() -> str:
        return "never reached: /search/ is proxied"

    return app


def config_for(urls: list[str], **top) -> dict:
    return {
        "pools": {"api": {"backends": urls}, "search": {"backends": urls[:1]}},
        "routes": [{"prefix": "/api/", "pool": "api"}],
        **top,
    }


def test_config_routes_kit_proxy_routes_and_untouched_views(serve, upstreams) -> None:
    app = flask_app(BALANCEKIT=config_for([u.url for u in upstreams[:2]]))
    kit = BalanceKit(app)
    kit.proxy("/search/", pool="search")
    server = serve(app, wsgi=True)
    with httpx.Client(base_url=server.url) as client:
        assert client.get("/").text == "flask home"
        backends = [client.get("/api/users").json()["backend"] for _ in range(4)]
        assert Counter(backends) == {"a": 2, "b": 2}
        searched = client.get("/search/q?term=x").json()
        assert (searched["backend"], searched["path"], searched["query"]) == (
            "a",
            "/search/q",
            "term=x",
        )
        assert client.get("/search").json()["path"] == "/search"
        assert client.post("/search/local", content=b"x").json()["body_size"] == 1
    assert kit.balancer.pools["api"].backends[0].requests_total == 2


def test_init_app_and_a_blueprint_whose_hooks_guard_the_proxied_path(serve, upstreams) -> None:
    kit = BalanceKit()
    blueprint = Blueprint("search", __name__, url_prefix="/v1")
    kit.proxy("/search/", pool="search", blueprint=blueprint, strip_prefix=True)

    @blueprint.before_request
    def require_token() -> None:
        if request.headers.get("x-token") != "yes":
            abort(401)

    def create_app() -> Flask:
        app = flask_app(BALANCEKIT=config_for([u.url for u in upstreams]))
        kit.init_app(app)
        app.register_blueprint(blueprint)
        return app

    server = serve(create_app(), wsgi=True)
    assert httpx.get(f"{server.url}/v1/search/q").status_code == 401
    echoed = httpx.get(f"{server.url}/v1/search/q?x=1", headers={"x-token": "yes"}).json()
    # strip_prefix strips the whole rule prefix, the blueprint's included
    assert (echoed["path"], echoed["query"]) == ("/q", "x=1")
    assert upstreams[0].app.seen == ["/q"]


def test_config_from_a_toml_path_and_secret_key_as_default_secret(tmp_path: Path, upstreams):
    path = tmp_path / "balancekit.toml"
    path.write_text(f'[pools.api]\nbackends = ["{upstreams[0].url}"]\n')
    app = flask_app(BALANCEKIT=str(path), SECRET_KEY="flask-secret")
    assert BalanceKit(app).balancer.config.secrets == ["flask-secret"]
    own = flask_app(BALANCEKIT={**config_for([upstreams[0].url]), "secret": ["new", "old"]})
    own.config["SECRET_KEY"] = "flask-secret"
    assert BalanceKit(own).balancer.config.secrets == ["new", "old"]


def test_configuration_errors_at_init_app() -> None:
    with pytest.raises(ConfigError, match=r"BALANCEKIT: set app.config"):
        BalanceKit(flask_app())
    with pytest.raises(ConfigError, match=r"pools.api.backends\[0\]"):
        BalanceKit(flask_app(BALANCEKIT={"pools": {"api": {"backends": ["ftp://x"]}}}))
    kit = BalanceKit()
    kit.proxy("/search/", pool="nope")
    with pytest.raises(ConfigError, match=r"proxy\('/search'\): unknown pool 'nope'"):
        kit.init_app(flask_app(BALANCEKIT=config_for(["http://127.0.0.1:1"])))


def problem(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["status"] == status and body["pool"] in ("api", "search")
    assert "127.0.0.1" not in response.text
    return body


@pytest.mark.parametrize("path", ["/api/x", "/search/x"])
def test_problem_json_502_503_504_from_middleware_and_view(serve, upstreams, path) -> None:
    urls = [closed_port_url()]
    config = config_for(urls)
    for pool in config["pools"].values():
        pool.update(timeouts={"read": 0.3}, retries={"attempts": 1})
    config["routes"][0]["strip_prefix"] = True
    app = flask_app(BALANCEKIT=config)
    kit = BalanceKit(app)
    kit.proxy("/search/", pool="search", strip_prefix=True)
    server = serve(app, wsgi=True)
    problem(httpx.get(server.url + path), 502)
    pool = kit.balancer.pools[path.split("/")[1]]
    pool.disable(urls[0])
    refused = httpx.get(server.url + path)
    problem(refused, 503)
    assert refused.headers["retry-after"]
    pool.remove_backend(urls[0])
    pool.add_backend(upstreams[0].url)
    problem(httpx.get(f"{server.url}{path.rsplit('/', 1)[0]}/sleep?s=2"), 504)


def test_a_proxy_view_streams_and_forwards_headers(serve, upstreams) -> None:
    app = flask_app(BALANCEKIT=config_for([upstreams[0].url]))
    BalanceKit(app).proxy("/", pool="search", endpoint="everything")
    server = serve(app, wsgi=True)
    started = time.monotonic()
    with httpx.stream("GET", f"{server.url}/stream?chunks=3&delay=0.4") as response:
        chunks = response.iter_raw()
        first = next(chunks)
        first_at = time.monotonic() - started
        rest = b"".join(chunks)
    assert first.startswith(b"chunk0") and (first + rest).count(b"chunk") == 3
    assert first_at < 0.6, "the first chunk waited for the backend to finish"
    echoed = httpx.get(
        f"{server.url}/x",
        headers={"connection": "keep-alive, x-hop", "x-hop": "1", "x-forwarded-for": "6.6.6.6"},
    ).json()
    headers = dict(echoed["headers"])
    assert "x-hop" not in headers and "connection" not in headers
    assert headers["x-forwarded-for"] == "127.0.0.1"
    assert headers["x-forwarded-host"] == f"127.0.0.1:{server.port}"
    assert headers["host"] == upstreams[0].url.removeprefix("http://")
    cookies = httpx.get(f"{server.url}/cookies")
    assert cookies.headers.get_list("set-cookie") == ["a=1; Path=/", "b=2; Path=/"]
    no_type = httpx.get(f"{server.url}/status/204")
    assert no_type.status_code == 204 and "content-type" not in no_type.headers


def test_flask_balancekit_status_command(upstreams) -> None:
    app = flask_app(BALANCEKIT=config_for([u.url for u in upstreams[:2]]))
    BalanceKit(app)
    result = app.test_cli_runner().invoke(args=["balancekit", "status"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split()[:4] == ["pool", "algorithm", "backend", "state"]
    assert sum(upstreams[0].url in line and "healthy" in line for line in lines) == 2


def test_one_balancer_shared_by_asgi_and_wsgi_keeps_one_rotation(serve, upstreams) -> None:
    balancer = Balancer(config_for([u.url for u in upstreams]))
    asgi = serve(ASGIBalanceMiddleware(app_fallback, balancer=balancer))
    wsgi = serve(BalanceMiddleware(flask_app().wsgi_app, balancer=balancer), wsgi=True)
    seen = []
    for i in range(6):
        front = asgi if i % 2 else wsgi
        seen.append(httpx.get(f"{front.url}/api/x").json()["backend"])
    assert seen == ["a", "b", "c", "a", "b", "c"]


def test_status_page_is_served_by_the_wsgi_middleware(serve, upstreams) -> None:
    app = flask_app(BALANCEKIT=config_for([upstreams[0].url], status={"enabled": True}))
    BalanceKit(app)
    server = serve(app, wsgi=True)
    status = httpx.get(f"{server.url}/balancekit/status.json").json()
    assert status["pools"]["api"]["backends"][0]["state"] == "healthy"
    page = httpx.get(f"{server.url}/balancekit/")
    assert page.headers["content-type"].startswith("text/html")
    assert json.loads(httpx.get(f"{server.url}/api/x").text)["backend"] == "a"


def balancekit_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "balancekit"]


def test_no_thread_until_the_first_request_and_none_after_close(serve, upstreams) -> None:
    config = config_for([upstreams[0].url])
    config["pools"]["api"]["health_check"] = {"type": "http", "path": "/", "interval": 0.2}
    before = len(balancekit_threads())
    app = flask_app(BALANCEKIT=config)
    kit = BalanceKit(app)
    assert len(balancekit_threads()) == before, "a thread was started before any request"
    server = serve(app, wsgi=True)
    assert httpx.get(f"{server.url}/").text == "flask home"  # any request starts the checks
    assert len(balancekit_threads()) == before + 1
    deadline = time.monotonic() + 5
    while len(upstreams[0].app.seen) < 2:  # the checks really run
        assert time.monotonic() < deadline, upstreams[0].app.seen
        time.sleep(0.05)
    kit.balancer.close()
    assert len(balancekit_threads()) == before


def test_a_proxy_view_rewrites_and_has_its_own_timeouts(serve, upstreams) -> None:
    app = flask_app(BALANCEKIT=config_for([upstreams[0].url]))
    kit = BalanceKit(app)
    kit.proxy("/search/", pool="search", rewrite="/v2/")
    kit.proxy(
        "/slowly/", pool="search", rewrite="/", timeouts={"read": 0.3}, retries={"attempts": 1}
    )
    server = serve(app, wsgi=True)
    echoed = httpx.get(f"{server.url}/search/q?term=x").json()
    assert (echoed["path"], echoed["query"]) == ("/v2/q", "term=x")
    assert httpx.get(f"{server.url}/search").json()["path"] == "/v2"
    started = time.monotonic()
    problem(httpx.get(f"{server.url}/slowly/sleep?s=2"), 504)  # the pool's read timeout is 60
    assert time.monotonic() - started < 1.5
    assert upstreams[0].app.seen[-1] == "/sleep"


def test_a_proxy_view_leaves_the_request_id_in_g(serve, upstreams) -> None:
    app = flask_app(BALANCEKIT=config_for([upstreams[0].url]))
    BalanceKit(app).proxy("/search/", pool="search")

    @app.after_request
    def note_the_id(response: Any) -> Any:  # what an app's own request log would read
        response.headers["X-Seen"] = g.get("balancekit_request_id", "none")
        return response

    server = serve(app, wsgi=True)
    answer = httpx.get(f"{server.url}/search/q", headers={"X-Request-ID": "q-5"})
    assert answer.headers["x-seen"] == "q-5" == answer.headers["x-request-id"]
    assert dict(answer.json()["headers"])["x-request-id"] == "q-5"


def test_a_split_proxy_view_keeps_each_key_on_its_side(serve, upstreams) -> None:
    config = {
        "pools": {
            "blue": {"backends": [upstreams[0].url]},
            "green": {"backends": [upstreams[1].url]},
        }
    }
    app = flask_app(BALANCEKIT=config)
    BalanceKit(app).proxy("/shop/", split={"blue": 50, "green": 50}, split_key="header:X-User")
    server = serve(app, wsgi=True)
    sides: dict[str, set[str]] = {}
    with httpx.Client(base_url=server.url) as client:
        for _ in range(3):
            for user in range(20):
                answer = client.get("/shop/cart", headers={"x-user": f"user-{user}"}).json()
                sides.setdefault(f"user-{user}", set()).add(answer["backend"])
    assert all(len(seen) == 1 for seen in sides.values()), sides
    assert set().union(*sides.values()) == {"a", "b"}, "both sides of the split are used"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        pytest.param(
            {"split": {"blue": 50, "green": 45}},
            r"proxy\('/shop'\)\.split: percentages add up to 95, not 100",
            id="split-not-100",
        ),
        pytest.param(
            {"pool": "blue", "split": {"blue": 100}},
            r"proxy\('/shop'\): needs exactly one of 'pool' and 'split'",
            id="pool-and-split",
        ),
        pytest.param(
            {"split": {"blue": 100}, "split_key": "session"},
            r"proxy\('/shop'\)\.split_key: must be 'ip', 'header:NAME'",
            id="bad-split-key",
        ),
        pytest.param(
            {"pool": "blue", "rewrite": "/v2/", "strip_prefix": True},
            r"proxy\('/shop'\)\.rewrite: excludes 'strip_prefix'",
            id="rewrite-and-strip-prefix",
        ),
        pytest.param(
            {"pool": "blue", "timeouts": {"raed": 1}},
            r"proxy\('/shop'\)\.timeouts\.raed: unknown key; did you mean 'read'\?",
            id="route-timeouts-typo",
        ),
    ],
)
def test_a_bad_proxy_route_fails_at_registration(options, message) -> None:
    kit = BalanceKit()  # no app yet: the route alone is checked
    with pytest.raises(ConfigError, match=message):
        kit.proxy("/shop/", **options)


def test_a_split_over_an_unknown_pool_fails_when_it_reaches_an_app() -> None:
    kit = BalanceKit()
    kit.proxy("/shop/", split={"search": 90, "ghost": 10})
    with pytest.raises(ConfigError, match=r"proxy\('/shop'\): unknown pool 'ghost'"):
        kit.init_app(flask_app(BALANCEKIT=config_for(["http://127.0.0.1:1"])))
