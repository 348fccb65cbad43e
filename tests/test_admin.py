"""The admin HTTP API and ``balancekit ctl`` (CONTRACT section 13): every
row of the table and every error status, on the ASGI middleware under
uvicorn, the WSGI middleware and ``balancekit serve``'s own server; a
change seen by a second process over Redis; ``ctl`` as a subprocess."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from balancekit import Balancer, ConfigError
from tests.conftest import free_port
from tests.helpers import balanced
from tests.test_commands import Running, started, wait_until_serving

TOKEN = "s3cret-admin"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def segment(url: str) -> str:
    """A backend URL as one path segment, as the API takes it."""
    return quote(url, safe="")


class Api:
    def __init__(self, base: str, balancer: Balancer) -> None:
        self.base = base + "/balancekit/api/"
        self.balancer = balancer

    def __call__(self, method: str, path: str, **options: Any) -> httpx.Response:
        options.setdefault("headers", AUTH)
        return httpx.request(method, self.base + path, timeout=10, **options)


@pytest.fixture(params=["aiohttp", "wsgi", "lean"])
def api(request, serve, upstreams) -> Api:
    server, balancer = balanced(
        serve,
        [upstreams[0].url, upstreams[1].url],
        engine=request.param,
        admin={"enabled": True, "token": TOKEN},
        status={"enabled": True},
    )
    return Api(server.url, balancer)


def problem_of(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["status"] == status
    return str(body["detail"])


def test_every_row_of_the_table(api: Api, upstreams) -> None:
    pool = api.balancer.pools["api"]
    listed = api("GET", "pools")
    assert listed.status_code == 200
    assert listed.headers["content-type"] == "application/json"
    assert listed.json() == api.balancer.status()["pools"]

    added = api("POST", "pools/api/backends", json={"url": upstreams[2].url, "weight": 3})
    assert added.status_code == 201
    assert added.json()["url"] == upstreams[2].url and added.json()["weight"] == 3
    assert pool.find(upstreams[2].url) is not None
    again = api("POST", "pools/api/backends", json={"url": upstreams[2].url})
    assert "already has backend" in problem_of(again, 409)
    backup = api("POST", "pools/api/backends", json={"url": "http://127.0.0.1:1", "backup": True})
    assert backup.status_code == 201 and pool.backend("http://127.0.0.1:1").backup

    url = segment(upstreams[0].url)
    for action, state in [("drain", "draining"), ("disable", "disabled"), ("enable", "healthy")]:
        answer = api("POST", f"pools/api/backends/{url}/{action}")
        assert answer.status_code == 200
        assert answer.json()["state"] == state == pool.backend(upstreams[0].url).state.value
    weighted = api("PUT", f"pools/api/backends/{url}/weight", json={"weight": 7})
    assert weighted.status_code == 200 and weighted.json()["weight"] == 7
    assert pool.backend(upstreams[0].url).weight == 7

    removed = api("DELETE", f"pools/api/backends/{segment(upstreams[2].url)}")
    assert removed.status_code == 202
    assert pool.find(upstreams[2].url) is None
    # Proxying goes on with what is left.
    assert httpx.get(api.base.replace("/balancekit/api/", "/api/x")).status_code == 200

    # Made from a dict, not a file: nothing to read again.
    assert "not started from a configuration file" in problem_of(api("POST", "reload"), 409)


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "detail"),
    [
        ("GET", "pools/nope/backends", None, 404, "no such pool: 'nope'"),
        ("POST", "pools/api/backends/http%3A%2F%2F127.0.0.1%3A2/drain", None, 404, "no backend"),
        ("GET", "elsewhere", None, 404, "no such admin resource"),
        ("POST", "pools/api/backends/{a}/explode", None, 404, "no such action"),
        ("POST", "pools/api/backends", b"not json", 400, "must be a JSON object"),
        ("POST", "pools/api/backends", b"[1, 2]", 400, "must be a JSON object"),
        ("POST", "pools/api/backends", b"{}", 400, "url: required"),
        ("POST", "pools/api/backends", b'{"url": 5}', 400, "url: must be a string"),
        ("POST", "pools/api/backends", b'{"url": "ftp://x"}', 400, "url:"),
        (
            "POST",
            "pools/api/backends",
            b'{"url": "http://127.0.0.1:3", "weight": "2"}',
            400,
            "weight: must be an integer",
        ),
        ("PUT", "pools/api/backends/{a}/weight", b'{"weight": true}', 400, "weight: must be"),
        ("PUT", "pools/api/backends/{a}/weight", b'{"weight": -1}', 400, "weight:"),
        ("POST", "pools", None, 405, "only GET"),
        ("GET", "reload", None, 405, "only POST"),
        ("GET", "pools/api/backends/{a}", None, 405, "only DELETE"),
        ("DELETE", "pools/api/backends/{a}/drain", None, 405, "only POST"),
        ("POST", "pools/api/backends/{a}/weight", None, 405, "only PUT"),
        ("POST", "pools/api/backends", b"x" * (70 * 1024), 400, "over 65536 bytes"),
        (
            "POST",
            "pools/api/backends",
            b'{"url": "http://127.0.0.1:3", "wieght": 2}',
            400,
            "wieght: unknown field",
        ),
        ("PUT", "pools/api/backends/{a}/weight", b'{"weight": 2, "x": 1}', 400, "x: unknown"),
    ],
)
def test_errors_are_problems_that_name_the_field(
    api, upstreams, method, path, body, status, detail
):
    path = path.replace("{a}", segment(upstreams[0].url))
    answer = api(method, path, content=body)
    assert detail in problem_of(answer, status)
    if status == 405:
        assert answer.headers["allow"] in ("GET", "POST", "PUT", "DELETE")
    # nothing changed
    assert [b.url for b in api.balancer.pools["api"].backends] == [u.url for u in upstreams[:2]]
    assert api.balancer.pools["api"].backends[0].weight == 1


@pytest.mark.parametrize(
    ("headers", "query"),
    [
        pytest.param({}, "", id="none"),
        pytest.param({"Authorization": "Bearer wrong"}, "", id="wrong"),
        pytest.param({"Authorization": f"Basic {TOKEN}"}, "", id="not-bearer"),
        pytest.param({}, f"?token={TOKEN}", id="query-token"),
    ],
)
def test_only_the_bearer_token_opens_it(api, upstreams, headers, query) -> None:
    url = segment(upstreams[0].url)
    answer = api("POST", f"pools/api/backends/{url}/drain{query}", headers=headers)
    assert "Bearer" in problem_of(answer, 401)
    assert answer.headers["www-authenticate"] == "Bearer"
    assert not api.balancer.pools["api"].backends[0].draining
    assert TOKEN not in answer.text


def test_a_client_outside_allow_is_refused(serve, upstreams) -> None:
    server, balancer = balanced(
        serve, [upstreams[0].url], admin={"enabled": True, "token": TOKEN, "allow": ["10.0.0.0/8"]}
    )
    answer = httpx.get(f"{server.url}/balancekit/api/pools", headers=AUTH)
    assert "allow" in problem_of(answer, 403)


def test_the_api_is_off_by_default_and_needs_a_token(serve, upstreams) -> None:
    server, _ = balanced(serve, [upstreams[0].url], prefix="/")
    echoed = httpx.get(f"{server.url}/balancekit/api/pools", headers=AUTH)
    assert echoed.json()["path"] == "/balancekit/api/pools"  # an ordinary path, proxied
    with pytest.raises(ConfigError, match=r"admin\.token: required when the admin API is enabled"):
        Balancer({"admin": {"enabled": True}})
    with pytest.raises(ConfigError, match=r"admin\.path"):
        Balancer({"admin": {"enabled": True, "token": "x", "path": "api"}})


def test_post_reload_reads_the_file_again(serve, upstreams, tmp_path: Path) -> None:
    config = tmp_path / "balancekit.toml"

    def write(urls: list[str]) -> None:
        config.write_text(
            f'[admin]\nenabled = true\ntoken = "{TOKEN}"\n'
            f"[pools.api]\nbackends = {urls!r}\n".replace("'", '"')
            + '[[routes]]\nprefix = "/api/"\npool = "api"\n'
        )

    write([upstreams[0].url])
    balancer = Balancer(config)
    from balancekit.asgi import BalanceMiddleware
    from tests.helpers import app_fallback

    server = serve(BalanceMiddleware(app_fallback, balancer=balancer))
    api = Api(server.url, balancer)
    write([upstreams[0].url, upstreams[1].url])
    answer = api("POST", "reload")
    assert answer.status_code == 200 and answer.json() == {"reloaded": True}
    assert len(balancer.pools["api"].backends) == 2
    config.write_text('[[routes]]\nprefix = "/"\npool = "gone"\n')
    detail = problem_of(api("POST", "reload"), 400)
    assert "the running configuration stays" in detail and "gone" in detail
    assert len(balancer.pools["api"].backends) == 2


# --- over Redis, and from the command line ----------------------------------------------


def serve_config(path: Path, redis_url: str, upstreams: list[Any]) -> None:
    path.write_text(
        f'store = "{redis_url}"\n'
        f'[admin]\nenabled = true\ntoken = "{TOKEN}"\n'
        f'[pools.api]\nbackends = ["{upstreams[0].url}", "{upstreams[1].url}"]\n'
        '[[routes]]\nprefix = "/"\npool = "api"\n'
    )


@pytest.fixture
def two_balancers(upstreams, redis_url, tmp_path) -> Iterator[tuple[str, str, Path]]:
    """Two ``balancekit serve`` processes over one Redis."""
    config = tmp_path / "balancekit.toml"
    serve_config(config, redis_url, upstreams)
    ports = [free_port(), free_port()]
    with (
        started("serve", str(config), "--port", str(ports[0])) as first,
        started("serve", str(config), "--port", str(ports[1])) as second,
    ):
        for running, port in ((first, ports[0]), (second, ports[1])):
            running.wait_for("serving on")
            wait_until_serving(f"http://127.0.0.1:{port}/")
        yield (*(f"http://127.0.0.1:{port}/balancekit/api/" for port in ports), config)
        for running in (first, second):
            assert running.stop(signal.SIGTERM) == 0


def test_a_change_through_one_process_reaches_another_within_a_second(
    two_balancers, upstreams
) -> None:
    one, other, _ = two_balancers
    url = segment(upstreams[1].url)
    assert httpx.post(f"{one}pools/api/backends/{url}/drain", headers=AUTH).status_code == 200
    drained_at = time.monotonic()
    while True:
        pools = httpx.get(f"{other}pools", headers=AUTH).json()
        if pools["api"]["backends"][1]["state"] == "draining":
            break
        assert time.monotonic() - drained_at < 1.0, pools
        time.sleep(0.02)


def ctl(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "balancekit", "ctl", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
        check=False,
    )


def test_ctl_drives_a_running_balancer(two_balancers, upstreams) -> None:
    url, _, config = two_balancers
    env = {"BALANCEKIT_URL": url, "BALANCEKIT_TOKEN": TOKEN}
    status = ctl("status", env=env)
    assert status.returncode == 0, status.stderr
    assert status.stdout.splitlines()[0].split()[:3] == ["pool", "algorithm", "backend"]
    assert upstreams[0].url in status.stdout and "healthy" in status.stdout

    added = ctl("add", "api", upstreams[2].url, "--weight", "4", env=env)
    assert added.returncode == 0, added.stderr
    assert upstreams[2].url in added.stdout and " 4 " in added.stdout
    drained = ctl("drain", "api", upstreams[2].url, env=env)
    assert "draining" in drained.stdout
    assert "disabled" in ctl("disable", "api", upstreams[2].url, env=env).stdout
    assert "healthy" in ctl("enable", "api", upstreams[2].url, env=env).stdout
    assert " 9 " in ctl("weight", "api", upstreams[2].url, "9", env=env).stdout
    removed = ctl("remove", "api", upstreams[2].url, env=env)
    assert removed.returncode == 0 and "leaves api" in removed.stdout
    assert upstreams[2].url not in ctl("status", env=env).stdout

    reloaded = ctl("--url", url, "--token", TOKEN, "reload")  # flags, not the environment
    assert reloaded.returncode == 0 and "configuration reloaded" in reloaded.stdout

    # Errors: the problem's detail, exit 1.
    missing = ctl("drain", "api", "http://127.0.0.1:2", env=env)
    assert missing.returncode == 1 and "404" in missing.stderr and "no backend" in missing.stderr
    wrong = ctl("status", env={**env, "BALANCEKIT_TOKEN": "nope"})
    assert wrong.returncode == 1 and "401" in wrong.stderr
    config.write_text("[pools.api]\nbackends = []\n")
    broken = ctl("reload", env=env)
    assert broken.returncode == 1 and "the running configuration stays" in broken.stderr
    nobody = ctl("--url", f"http://127.0.0.1:{free_port()}/balancekit/api/", "status")
    assert nobody.returncode == 1 and "Error" in nobody.stderr


def test_post_reload_under_workers_reloads_every_worker(upstreams, redis_url, tmp_path) -> None:
    config = tmp_path / "balancekit.toml"
    serve_config(config, redis_url, upstreams)
    port = free_port()
    with started("serve", str(config), "--port", str(port), "--workers", "2") as running:
        running.wait_for("2 workers")
        wait_until_serving(f"http://127.0.0.1:{port}/")
        url = f"http://127.0.0.1:{port}/balancekit/api/"
        answer = httpx.post(f"{url}reload", headers=AUTH)
        assert answer.status_code == 200
        wait_for_reloads(running, 2)
        assert running.stop(signal.SIGTERM) == 0


def wait_for_reloads(running: Running, count: int) -> None:
    """Until ``count`` workers said they reloaded (from the supervisor's SIGHUP)."""
    deadline = time.monotonic() + 10
    while sum("supervisor" not in line and "reloaded" in line for line in running.lines) < count:
        assert time.monotonic() < deadline, running.lines
        time.sleep(0.05)


def test_the_dashboard_drains_and_enables_through_the_api(serve, upstreams, browser) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    server, balancer = balanced(
        serve,
        [upstreams[0].url, upstreams[1].url],
        status={"enabled": True},
        admin={"enabled": True, "token": TOKEN},
    )
    backend = balancer.pools["api"].backends[0]
    wait = WebDriverWait(browser, 10, poll_frequency=0.1)

    def states() -> list[str]:
        return list(
            browser.execute_script(
                "return Array.from(document.querySelectorAll("
                "'#rows td[data-label=\"state\"]'), c => c.textContent.trim())"
            )
        )

    def click(row: int, action: str) -> None:
        browser.execute_script(
            "document.querySelectorAll('#rows tr')[arguments[0]]"
            ".querySelector('button[data-action=\"' + arguments[1] + '\"]').click()",
            row,
            action,
        )

    # Without the token in the fragment: the table, and no buttons.
    browser.get(f"{server.url}/balancekit/")
    wait.until(lambda d: "updated" in d.find_element(By.ID, "meta").text)
    assert browser.find_elements(By.CSS_SELECTOR, "#rows button") == []

    browser.get("about:blank")  # else a new fragment alone would not load the page again
    browser.get(f"{server.url}/balancekit/#admin={TOKEN}")
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#rows button")) == 6)
    headings = [th.text for th in browser.find_elements(By.CSS_SELECTOR, "thead th")]
    assert headings[-1] == "actions"

    def enabled_draining() -> tuple[bool, bool]:
        return backend.enabled, backend.draining

    click(0, "drain")
    wait.until(lambda d: states()[0] == "draining")
    assert enabled_draining() == (True, True)
    click(0, "disable")
    wait.until(lambda d: states()[0] == "disabled")
    assert enabled_draining()[0] is False
    click(0, "enable")
    wait.until(lambda d: states()[0] == "healthy")
    assert enabled_draining() == (True, False)

    # Where each backend came from: the configuration, or a runtime add.
    balancer.pools["api"].add_backend(upstreams[2].url)

    def sources() -> list[str]:
        return list(
            browser.execute_script(
                "return Array.from(document.querySelectorAll("
                "'#rows td[data-label=\"source\"]'), c => c.textContent.trim())"
            )
        )

    wait.until(lambda d: sources() == ["config", "config", "runtime"])

    # A wrong token: the API's refusal on the page, nothing changed.
    browser.get("about:blank")
    browser.get(f"{server.url}/balancekit/#admin=wrong")
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#rows button")) == 9)
    click(1, "drain")
    wait.until(lambda d: "drain: needs Authorization" in d.find_element(By.ID, "meta").text)
    assert not balancer.pools["api"].backends[1].draining
