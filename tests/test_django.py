"""balancekit_django in process (pytest-django, SQLite): models, checks,
propagation, the command, the admin and the middleware against real backends."""

from __future__ import annotations

import json
from collections.abc import Iterator
from io import StringIO

import pytest
from django.contrib.auth.models import Permission, User
from django.core.exceptions import NON_FIELD_ERRORS, ValidationError
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from django.db import connection
from django.db.migrations.executor import MigrationExecutor
from django.test import Client, override_settings

from balancekit_django import runtime as runtime_module
from balancekit_django.checks import check_balancekit
from balancekit_django.models import Backend, Pool, Route, State
from balancekit_django.runtime import Runtime

pytestmark = pytest.mark.django_db


def version() -> int:
    return State.objects.values_list("version", flat=True).first() or 0


@pytest.fixture
def fresh_runtime(monkeypatch) -> Iterator[Runtime]:
    """A runtime of this test's own, as the middleware and the admin see it."""
    made = Runtime()
    monkeypatch.setattr(runtime_module, "_runtime", made)
    yield made
    made.stop()
    made.balancer.close()


def test_every_kind_of_change_bumps_the_version() -> None:
    seen = [version()]

    def bumped() -> bool:
        seen.append(version())
        return seen[-1] > seen[-2]

    pool = Pool.objects.create(name="api")
    assert bumped()
    backend = Backend.objects.create(pool=pool, url="http://10.0.0.1")
    assert bumped()
    Route.objects.create(prefix="/api/", pool=pool)
    assert bumped()
    Backend.objects.filter(pk=backend.pk).update(weight=5)  # no signal: bumped all the same
    assert bumped()
    backend.weight = 2
    Backend.objects.bulk_update([backend], ["weight"])
    assert bumped()
    Backend.objects.bulk_create([Backend(pool=pool, url="http://10.0.0.2")])
    assert bumped()
    Backend.objects.filter(pk=backend.pk).delete()
    assert bumped()


def test_model_validation_speaks_the_config_key_paths() -> None:
    pool = Pool(name="api", settings={"timeouts": {"connect": -1}})
    with pytest.raises(ValidationError) as caught:
        pool.full_clean()
    assert "pools.api.timeouts.connect" in str(caught.value)
    pool = Pool(name="api", algorithm="fastest")
    with pytest.raises(ValidationError, match="unknown algorithm 'fastest'"):
        pool.full_clean()
    backend = Backend(pool=Pool.objects.create(name="p"), url="ftp://x", weight=1)
    with pytest.raises(ValidationError, match="must be an http:// or https:// URL"):
        backend.full_clean()


def test_the_database_pools_join_and_follow_changes(fresh_runtime: Runtime) -> None:
    assert fresh_runtime.balancer.config.secrets == ["tests-only"], "SECRET_KEY by default"
    assert fresh_runtime.refresh() is True or fresh_runtime.version is not None
    pool = Pool.objects.create(name="db")
    Backend.objects.create(pool=pool, url="http://10.0.0.1")
    Backend.objects.create(pool=pool, url="http://10.0.0.2")
    Route.objects.create(prefix="/db/", pool=pool)
    assert fresh_runtime.refresh()
    balancer = fresh_runtime.balancer
    assert [b.url for b in balancer.pools["db"].backends] == ["http://10.0.0.1", "http://10.0.0.2"]
    live = balancer.pools["db"].backend("http://10.0.0.1")
    Backend.objects.filter(url="http://10.0.0.2").update(enabled=False)
    assert fresh_runtime.refresh()
    assert balancer.pools["db"].backend("http://10.0.0.2").state.value == "disabled"
    assert balancer.pools["db"].backend("http://10.0.0.1") is live, "live state kept"
    assert fresh_runtime.refresh() is False, "nothing changed: one query, no reload"


def test_a_bad_database_pool_keeps_the_last_good_configuration(fresh_runtime, caplog) -> None:
    pool = Pool.objects.create(name="db")
    Backend.objects.create(pool=pool, url="http://10.0.0.1")
    fresh_runtime.refresh()
    Pool.objects.filter(pk=pool.pk).update(algorithm="fastest")  # past model validation
    fresh_runtime.refresh()
    assert fresh_runtime.balancer.pools["db"].algorithm.name == "round_robin"
    assert "keeping the last good ones" in caplog.text


@override_settings(
    BALANCEKIT={
        "pools": {"api": {"backends": [{"url": "http://10.0.0.1", "weight": -3}]}},
        "status": {"enabled": True},
        "trusted_proxies": ["0.0.0.0/0"],
    }
)
def test_checks_report_key_paths_and_risky_settings() -> None:
    found = {m.id: m for m in check_balancekit()}
    assert (
        "pools.api.backends[0].weight: must be a positive integer" in found["balancekit.E001"].msg
    )
    assert found["balancekit.W001"].msg.startswith("the status page is enabled without")
    assert "0.0.0.0/0" in found["balancekit.W002"].msg


@override_settings(BALANCEKIT={"pools": {"api": {"backends": ["http://10.0.0.1"]}}})
def test_a_pool_in_settings_and_database_is_an_error() -> None:
    Backend.objects.create(pool=Pool.objects.create(name="api"), url="http://10.0.0.2")
    ids = [m.id for m in check_balancekit()]
    assert "balancekit.E002" in ids
    with pytest.raises(SystemCheckError, match="balancekit.E002"):
        call_command("check")


def test_balancekit_status_command(fresh_runtime: Runtime) -> None:
    pool = Pool.objects.create(name="db")
    Backend.objects.create(pool=pool, url="http://10.0.0.9", weight=2)
    out = StringIO()
    call_command("balancekit_status", stdout=out)
    lines = out.getvalue().splitlines()
    assert lines[0].split()[:4] == ["pool", "algorithm", "backend", "state"]
    assert any(
        line.split()[:5] == ["db", "round_robin", "http://10.0.0.9", "healthy", "2"]
        for line in lines
    )
    out = StringIO()
    call_command("balancekit_status", "--json", stdout=out)
    assert json.loads(out.getvalue())["pools"]["db"]["backends"][0]["weight"] == 2


def test_the_middleware_proxies_routed_paths_and_leaves_the_rest(fresh_runtime, upstreams) -> None:
    pool = Pool.objects.create(name="db")
    for upstream in upstreams[:2]:
        Backend.objects.create(pool=pool, url=upstream.url)
    Route.objects.create(prefix="/api/", pool=pool, strip_prefix=True)
    # Django's test client sends no Host unless told: an HTTP/1.1 request
    # without one is refused on a proxied path (RFC 9112 section 3.2).
    assert Client().get("/api/users").status_code == 400
    client = Client(HTTP_HOST="testserver")
    assert client.get("/view/").content == b"django view"
    first = client.get("/api/users?x=1")
    assert first.status_code == 200
    body = json.loads(b"".join(first.streaming_content))
    assert (body["path"], body["query"]) == ("/users", "x=1")
    second = json.loads(b"".join(client.get("/api/users").streaming_content))
    assert {body["backend"], second["backend"]} == {"a", "b"}
    cookies = client.get("/api/cookies")
    cookies.close()  # as a server does: the upstream connection goes back
    assert [v for k, v in cookies.items() if k.lower() == "set-cookie"] == [
        "a=1; Path=/",
        "b=2; Path=/",
    ]


def admin_user(*, can_change: bool) -> User:
    user = User.objects.create_user("op", password="pw", is_staff=True)
    names = ["view_backend"] + (["change_backend"] if can_change else [])
    user.user_permissions.set(Permission.objects.filter(codename__in=names))
    return user


def test_admin_lists_live_state_and_actions_need_change_permission(fresh_runtime) -> None:
    pool = Pool.objects.create(name="db")
    backend = Backend.objects.create(pool=pool, url="http://10.0.0.1")
    fresh_runtime.refresh()
    viewer = Client()
    viewer.force_login(admin_user(can_change=False))
    page = viewer.get("/admin/balancekit/backend/")
    assert page.status_code == 200
    assert b"http://10.0.0.1" in page.content and b"healthy" in page.content
    assert b'value="disable"' not in page.content, "no actions for a viewer"
    refused = viewer.post(
        "/admin/balancekit/backend/", {"action": "disable", "_selected_action": [backend.pk]}
    )
    assert Backend.objects.get(pk=backend.pk).enabled
    assert refused.status_code in (200, 302, 403)
    User.objects.all().delete()
    operator = Client()
    operator.force_login(admin_user(can_change=True))
    done = operator.post(
        "/admin/balancekit/backend/", {"action": "disable", "_selected_action": [backend.pk]}
    )
    assert done.status_code == 302
    assert not Backend.objects.get(pk=backend.pk).enabled
    fresh_runtime.refresh()
    page = operator.get("/admin/balancekit/backend/?state=disabled")
    assert b"http://10.0.0.1" in page.content


@pytest.mark.django_db(transaction=True)
def test_the_admin_in_a_real_browser(live_server, browser, fresh_runtime, upstreams) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    from tests.conftest import ARTIFACTS

    pool = Pool.objects.create(name="web")
    for upstream in upstreams[:2]:
        Backend.objects.create(pool=pool, url=upstream.url)
    fresh_runtime.refresh()
    User.objects.create_superuser("root", "root@example.com", "pw")
    browser.get(f"{live_server.url}/admin/login/?next=/admin/balancekit/backend/")
    browser.find_element(By.NAME, "username").send_keys("root")
    browser.find_element(By.NAME, "password").send_keys("pw")
    browser.find_element(By.CSS_SELECTOR, "input[type=submit]").click()
    rows = browser.find_elements(By.CSS_SELECTOR, "#result_list tbody tr")
    assert len(rows) == 2
    assert all("healthy" in row.text for row in rows)
    rows[1].find_element(By.CSS_SELECTOR, "input.action-select").click()
    Select(browser.find_element(By.NAME, "action")).select_by_value("disable")
    browser.find_element(By.CSS_SELECTOR, "button[name=index]").click()
    message = browser.find_element(By.CSS_SELECTOR, ".messagelist").text
    assert "Disabled 1 backend(s)" in message
    fresh_runtime.refresh()  # what the worker's watcher does within seconds
    browser.get(f"{live_server.url}/admin/balancekit/backend/")
    states = [row.text for row in browser.find_elements(By.CSS_SELECTOR, "#result_list tbody tr")]
    assert sum("disabled" in text for text in states) == 1
    browser.save_screenshot(str(ARTIFACTS / "django-admin-backends.png"))
    assert fresh_runtime.balancer.pools["web"].backend(upstreams[1].url).state.value == "disabled"


@override_settings(BALANCEKIT={"status": {"enabled": True}})
def test_the_status_path_is_for_staff_by_default(monkeypatch) -> None:
    made = Runtime()
    monkeypatch.setattr(runtime_module, "_runtime", made)
    client = Client()
    assert client.get("/balancekit/status.json").status_code == 403
    client.force_login(User.objects.create_user("visitor", password="pw"))
    assert client.get("/balancekit/status.json").status_code == 403
    client.force_login(User.objects.create_user("op", password="pw", is_staff=True))
    answer = client.get("/balancekit/status.json")
    assert answer.status_code == 200 and b"pools" in b"".join(answer.streaming_content)
    made.balancer.close()


def echo(client: Client, path: str, method: str = "get") -> dict:
    """The upstream echo app's report of the request it got."""
    response = getattr(client, method)(path)
    assert response.status_code == 200, response
    return json.loads(b"".join(response.streaming_content))


def test_a_route_by_host_reaches_another_pool_than_the_plain_prefix(
    fresh_runtime, upstreams
) -> None:
    web, internal = Pool.objects.create(name="web"), Pool.objects.create(name="internal")
    Backend.objects.create(pool=web, url=upstreams[0].url)
    Backend.objects.create(pool=internal, url=upstreams[1].url)
    Route.objects.create(prefix="/api/", pool=web)
    Route.objects.create(
        prefix="/api/", host="internal.example.com", methods=["GET"], pool=internal, rewrite="/v2/"
    )
    plain = Client(HTTP_HOST="testserver")
    by_host = Client(HTTP_HOST="Internal.Example.com:8000")
    assert (echo(plain, "/api/x")["backend"], echo(plain, "/api/x")["path"]) == ("a", "/api/x")
    routed = echo(by_host, "/api/x?y=1")
    assert (routed["backend"], routed["path"], routed["query"]) == ("b", "/v2/x", "y=1")
    assert echo(by_host, "/api/x", "post")["backend"] == "a", "GET only: POST takes the plain one"
    _, routes, _ = runtime_module.database_config()
    assert routes == [  # only the keys that are set, in the contract's names
        {"prefix": "/api/", "strip_prefix": False, "pool": "web"},
        {
            "prefix": "/api/",
            "strip_prefix": False,
            "pool": "internal",
            "host": "internal.example.com",
            "rewrite": "/v2/",
            "methods": ["GET"],
        },
    ]


def test_a_proxied_request_carries_its_id_for_the_apps_logs(fresh_runtime, upstreams) -> None:
    web = Pool.objects.create(name="web")
    Backend.objects.create(pool=web, url=upstreams[0].url)
    Route.objects.create(prefix="/api/", pool=web)
    response = Client(HTTP_HOST="testserver").get("/api/x", HTTP_X_REQUEST_ID="order-17")
    assert response.wsgi_request.balancekit_request_id == "order-17"
    assert dict(response.raw_headers)["x-request-id"] == "order-17"
    assert (
        dict(json.loads(b"".join(response.streaming_content))["headers"])["x-request-id"]
        == "order-17"
    )


@pytest.mark.parametrize(
    ("fields", "field", "message"),
    [
        pytest.param(
            {"split": {"p": 50, "q": 45}},
            "split",
            "percentages add up to 95, not 100",
            id="split-not-100",
        ),
        pytest.param(
            {"split": {"p": 50, "ghost": 50}},
            "split",
            "split.ghost: unknown pool 'ghost'",
            id="split-unknown-pool",
        ),
        pytest.param(
            {"pool": "p", "strip_prefix": True, "rewrite": "/v2/"},
            "rewrite",
            "excludes 'strip_prefix': the prefix is replaced either way",
            id="rewrite-with-strip-prefix",
        ),
        pytest.param(
            {"pool": "p", "methods": ["FETCH"]},
            "methods",
            "unknown method 'FETCH'",
            id="unknown-method",
        ),
        pytest.param(
            {"pool": "p", "timeouts": {"read": -1}},
            "timeouts",
            "timeouts.read: must be",
            id="route-timeouts",
        ),
        pytest.param(
            {}, NON_FIELD_ERRORS, "needs exactly one of 'pool' and 'split'", id="no-pool-no-split"
        ),
    ],
)
def test_route_clean_puts_each_problem_on_its_field(fields, field, message) -> None:
    pools = {name: Pool.objects.create(name=name) for name in ("p", "q")}
    if "pool" in fields:
        fields = {**fields, "pool": pools[fields["pool"]]}
    with pytest.raises(ValidationError) as caught:
        Route(prefix="/api/", **fields).full_clean()
    errors = caught.value.message_dict
    assert list(errors) == [field], errors
    assert errors[field][0].startswith(message), errors


@override_settings(BALANCEKIT={"pools": {"canary": {"backends": ["http://10.0.0.1"]}}})
def test_a_split_may_name_a_database_pool_and_a_settings_pool() -> None:
    Pool.objects.create(name="api")
    Route(prefix="/", split={"api": 90, "canary": 10}, split_key="cookie:uid").full_clean()


@pytest.mark.django_db(transaction=True)
def test_the_migration_keeps_existing_routes_and_lets_prefixes_repeat() -> None:
    executor = MigrationExecutor(connection)
    before = [("balancekit", "0001_initial")]
    executor.migrate(before)
    old = executor.loader.project_state(before).apps
    pool = old.get_model("balancekit", "Pool").objects.create(name="api")
    old.get_model("balancekit", "Route").objects.create(
        prefix="/api/", pool=pool, strip_prefix=True
    )
    executor.loader.build_graph()
    executor.migrate([("balancekit", "0002_route_conditions_split_rewrite")])
    assert [r.as_config() for r in Route.objects.all()] == [
        {"prefix": "/api/", "strip_prefix": True, "pool": "api"}
    ]
    Route.objects.create(prefix="/api/", host="api.example.com", split={"api": 100})
    assert Route.objects.filter(prefix="/api/").count() == 2


def test_the_route_admin_shows_conditions_and_splits_and_field_errors(fresh_runtime) -> None:
    blue, green = Pool.objects.create(name="blue"), Pool.objects.create(name="green")
    Route.objects.create(prefix="/shop/", split={"blue": 90, "green": 10}, methods=["GET"])
    operator = Client()
    operator.force_login(User.objects.create_superuser("root", "root@example.com", "pw"))
    listed = operator.get("/admin/balancekit/route/")
    assert b"blue 90%, green 10%" in listed.content and b"GET" in listed.content
    assert operator.get(f"/admin/balancekit/pool/{blue.pk}/change/").status_code == 200
    form = {"prefix": "/api/", "pool": green.pk, "methods": '["FETCH"]', "strip_prefix": ""}
    refused = operator.post("/admin/balancekit/route/add/", {**form, "split": "", "headers": ""})
    assert refused.status_code == 200, "the form again, with the error on its field"
    assert (
        refused.context["adminform"].form.errors["methods"][0].startswith("unknown method 'FETCH'")
    )
    assert Route.objects.count() == 1
