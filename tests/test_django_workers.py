"""The example Django project on PostgreSQL, under gunicorn (WSGI) and uvicorn
(ASGI) with two workers each: changes reach every worker within 5 s."""

from __future__ import annotations

import os
import re
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import free_port, need

PROJECT = Path(__file__).parent.parent / "example_projects" / "django_app"
PG = "host=127.0.0.1 user=postgres dbname=postgres connect_timeout=3"


@pytest.fixture
def database(tmp_path: Path) -> Iterator[dict[str, str]]:
    """A fresh PostgreSQL database, migrated, and the environment to use it."""
    import psycopg

    try:
        admin = psycopg.connect(PG, autocommit=True)
    except psycopg.OperationalError as exc:
        need(False, f"PostgreSQL on 127.0.0.1:5432: {exc}")
        raise
    name = f"balancekit_{uuid.uuid4().hex[:12]}"
    admin.execute(f'CREATE DATABASE "{name}"')
    config = tmp_path / "balancekit.toml"
    config.write_text("access_log = false\n")
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "mysite.settings",  # not pytest-django's
        "BALANCEKIT_EXAMPLE_PG": name,
        "BALANCEKIT_CONFIG": str(config),
        "DEBUG": "0",
        "PYTHONUNBUFFERED": "1",
    }
    try:
        manage(env, "migrate", "-v0")
        yield env
    finally:
        admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        admin.close()


def manage(env: dict[str, str], *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=PROJECT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@contextmanager
def server(env: dict[str, str], kind: str) -> Iterator[str]:
    port = free_port()
    bind = ["--bind", f"127.0.0.1:{port}"]
    command = {
        "gunicorn": ["-m", "gunicorn", "--workers", "2", "--threads", "4", *bind, "mysite.wsgi"],
        "uvicorn": [
            *("-m", "uvicorn", "mysite.asgi:application", "--workers", "2"),
            *("--port", str(port), "--lifespan", "off", "--log-level", "warning"),
        ],
    }[kind]
    process = subprocess.Popen(
        [sys.executable, *command],
        cwd=PROJECT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its workers too can be ended, by process group
    )
    url = f"http://127.0.0.1:{port}"
    stderr = ""
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(url + "/", timeout=5)
                break
            except httpx.HTTPError:
                assert process.poll() is None, process.communicate()[1]
                assert time.monotonic() < deadline
                time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        try:
            _, stderr = process.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # the group we started
            _, stderr = process.communicate(timeout=10)
        print(f"--- {kind} stderr ---\n{stderr[-3000:]}")
    assert "Traceback" not in stderr, stderr


def every_worker(urls: list[str], check: Callable[[dict[str, Any]], bool], timeout: float) -> float:
    """Seconds until both workers of every server pass ``check`` on their pools."""
    started = time.monotonic()
    report: dict[str, Any] = {}
    for url in urls:
        passed: set[int] = set()
        while len(passed) < 2:
            elapsed = time.monotonic() - started
            assert elapsed < timeout, (
                f"{url}: {len(passed)} of 2 workers after {elapsed:.1f}s; last: {report}"
            )
            report = httpx.get(url + "/worker/", timeout=5).json()
            if check(report["status"]["pools"]):
                passed.add(report["pid"])
            else:
                passed.discard(report["pid"])
                time.sleep(0.02)
    return time.monotonic() - started


def state_of(url: str) -> Callable[[dict[str, Any]], str | None]:
    def read(pools: dict[str, Any]) -> str | None:
        for backend in pools.get("db", {}).get("backends", []):
            if backend["url"] == url:
                return str(backend["state"])
        return None

    return read


def has_state(url: str, enabled: bool) -> Callable[[dict[str, Any]], bool]:
    wanted = "healthy" if enabled else "disabled"
    return lambda pools: state_of(url)(pools) == wanted


ORM_SETUP = """
from django.contrib.auth.models import User
from balancekit_django.models import Backend, Pool, Route
pool = Pool.objects.create(name="db")
for url in {urls!r}:
    Backend.objects.create(pool=pool, url=url)
Route.objects.create(prefix="/api/", pool=pool, strip_prefix=True)
User.objects.create_superuser("admin", "admin@example.com", "pw")
"""


def admin_action(url: str, action: str, backend_id: int) -> None:
    """Log in to the admin and run a changelist action, as a person would."""
    with httpx.Client(base_url=url, timeout=10) as client:
        page = client.get("/admin/login/")
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text)
        assert token is not None
        login = client.post(
            "/admin/login/?next=/admin/",
            data={"username": "admin", "password": "pw", "csrfmiddlewaretoken": token.group(1)},
        )
        assert login.status_code == 302, login.text
        changelist = client.get("/admin/balancekit/backend/")
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', changelist.text)
        assert token is not None
        done = client.post(
            "/admin/balancekit/backend/",
            data={
                "action": action,
                "_selected_action": str(backend_id),
                "csrfmiddlewaretoken": token.group(1),
            },
        )
        assert done.status_code == 302, done.text


def test_changes_reach_every_worker_of_gunicorn_and_uvicorn(database, upstreams) -> None:
    import psycopg

    urls = [u.url for u in upstreams[:2]]
    with server(database, "gunicorn") as wsgi, server(database, "uvicorn") as asgi:
        fronts = [wsgi, asgi]
        # created through the ORM, after the servers started
        manage(database, "shell", "-c", ORM_SETUP.format(urls=urls))
        took = every_worker(
            fronts, lambda pools: len(pools.get("db", {}).get("backends", [])) == 2, 8
        )
        print(f"\npool created through the ORM: all 4 workers after {took:.2f}s")
        assert took <= 5
        for front in fronts:
            backends = {httpx.get(f"{front}/api/x").json()["backend"] for _ in range(4)}
            assert backends == {"a", "b"}

        # disabled through the admin: b stops receiving traffic in every worker
        dsn = PG.replace("dbname=postgres", f"dbname={database['BALANCEKIT_EXAMPLE_PG']}")
        connection = psycopg.connect(dsn, autocommit=True)  # each transaction() commits
        found = connection.execute("SELECT id FROM balancekit_backend WHERE url = %s", [urls[1]])
        b_id = found.fetchall()[0][0]
        admin_action(wsgi, "disable", b_id)
        took = every_worker(fronts, lambda pools: state_of(urls[1])(pools) == "disabled", 8)
        print(f"disabled in the admin: all 4 workers after {took:.2f}s")
        assert took <= 5
        for front in fronts:
            assert {httpx.get(f"{front}/api/x").json()["backend"] for _ in range(4)} == {"a"}

        # 20 changes as QuerySet.update makes them (no signals: the row and
        # the version in one transaction), timed until every worker has each
        times = []
        for i in range(20):
            enabled = i % 2 == 0
            with connection.transaction():
                connection.execute(
                    "UPDATE balancekit_backend SET enabled = %s WHERE id = %s", [enabled, b_id]
                )
                connection.execute("UPDATE balancekit_state SET version = version + 1")
            times.append(every_worker(fronts, has_state(urls[1], enabled), 8))
        # The database fails the workers' reads: the last good pools keep serving.
        connection.execute("ALTER TABLE balancekit_state RENAME TO balancekit_state_away")
        deadline = time.monotonic() + 3  # more than one poll
        while time.monotonic() < deadline:
            for front in fronts:
                assert httpx.get(f"{front}/api/x").status_code == 200
            time.sleep(0.2)
        connection.execute("ALTER TABLE balancekit_state_away RENAME TO balancekit_state")
        with connection.transaction():
            connection.execute(
                "UPDATE balancekit_backend SET enabled = false WHERE id = %s", [b_id]
            )
            connection.execute("UPDATE balancekit_state SET version = version + 1")
        assert every_worker(fronts, has_state(urls[1], False), 8) <= 5
        connection.close()
        median, worst = statistics.median(times), max(times)
        print(f"20 changes: median {median:.2f}s, max {worst:.2f}s to reach all 4 workers")
        assert worst <= 5
