"""Session persistence through real servers: signed cookies, session keys, stores."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from balancekit import Balancer, ConfigError
from balancekit._request import RequestInfo
from balancekit.persistence.cookie import CookiePersistence, backend_token
from balancekit.stores import MemoryStore
from tests.conftest import free_port
from tests.helpers import balanced
from tests.upstreams import NamedUpstream

SECRET = "s3cret"


@pytest.fixture(params=["aiohttp", "wsgi"])
def engine(request: pytest.FixtureRequest) -> str:
    """Persistence is decided by the shared core: checked on both engines."""
    return str(request.param)


@pytest.fixture
def named(serve) -> list[tuple[NamedUpstream, object]]:
    apps = [NamedUpstream(name) for name in ("a", "b", "c")]
    return [(app, serve(app)) for app in apps]


def urls(named) -> list[str]:
    return [server.url for _, server in named]


def cookie_pool(named, **persistence) -> dict:
    return {"persistence": {"type": "cookie", "name": "bk", **persistence}}


def pin_of(response: httpx.Response) -> str | None:
    """The value of the ``bk`` cookie this response sets, if it sets one."""
    for header in response.headers.get_list("set-cookie"):
        if header.startswith("bk="):
            return header.split(";", 1)[0][3:]
    return None


def test_cookie_pins_a_client_and_never_reveals_the_backend(serve, named, engine) -> None:
    server, balancer = balanced(
        serve, urls(named), engine=engine, pool=cookie_pool(named), secret=SECRET
    )
    first = httpx.get(f"{server.url}/api/x")
    header = first.headers["set-cookie"]
    value = pin_of(first)
    assert value is not None
    assert header == f"bk={value}; HttpOnly; Path=/; SameSite=Lax"
    for url in urls(named):  # neither address nor port, in any form
        host, port = url.removeprefix("http://").split(":")
        assert port not in value and host not in value
    pinned = first.text
    assert value is not None
    with httpx.Client(base_url=server.url, cookies={"bk": value}) as client:
        answers = [client.get("/api/x") for _ in range(9)]
    assert {a.text for a in answers} == {pinned}
    assert all(pin_of(a) is None for a in answers), "an unchanged pin is not set again"
    # clients without the cookie are still balanced over every backend
    assert {httpx.get(f"{server.url}/api/x").text for _ in range(3)} == {"a", "b", "c"}


@pytest.mark.parametrize(
    "value", ["garbage", "", "%%%", "x" * 4000, "é", "AAAAAAAAAAAAAAAA", '"quoted"']
)
def test_tampered_and_garbage_cookies_are_ignored_and_replaced(serve, named, value) -> None:
    server, balancer = balanced(serve, urls(named), pool=cookie_pool(named), secret=SECRET)
    good = pin_of(httpx.get(f"{server.url}/api/x"))
    assert good is not None
    for sent in (value, good[:-2] + ("AA" if good[-2:] != "AA" else "BB")):
        cookie = [(b"cookie", f"bk={sent}".encode())]
        response = httpx.get(f"{server.url}/api/x", headers=cookie)
        assert response.status_code == 200
        assert pin_of(response) not in (None, sent)
    assert balancer.pools["api"].active_requests == 0


def test_rotated_secret_keeps_sessions_and_signs_with_the_new_one(serve, named) -> None:
    old = backend_token(b"old", "api", urls(named)[1])
    server, _ = balanced(
        serve, urls(named), pool=cookie_pool(named, max_age=60), secret=["new", "old"]
    )
    kept = httpx.get(f"{server.url}/api/x", cookies={"bk": old})
    assert kept.text == "b" and pin_of(kept) is None
    fresh = httpx.get(f"{server.url}/api/x")
    assert pin_of(fresh) == backend_token(b"new", "api", urls(named)[ord(fresh.text) - 97])
    assert "; Max-Age=60" in fresh.headers["set-cookie"]


def test_secure_flag_for_https_clients() -> None:
    balancer = Balancer(
        {
            "secret": SECRET,
            "pools": {"api": {"backends": ["http://10.0.0.1"], "persistence": "cookie"}},
        }
    )
    pool = balancer.pools["api"]
    persistence: Any = pool.persistence
    assert isinstance(persistence, CookiePersistence)
    backend = pool.backends[0]
    https = persistence.remember(RequestInfo("GET", "/", scheme="https"), backend, pool)
    assert https[0][1].endswith(b"; SameSite=Lax; Secure")
    assert https[0][1].startswith(b"balancekit_api=")
    http = persistence.remember(RequestInfo("GET", "/"), backend, pool)
    assert not http[0][1].endswith(b"Secure")


def test_the_pin_moves_off_a_killed_backend_and_stays_on_a_draining_one(
    serve, named, engine
) -> None:
    server, balancer = balanced(
        serve, urls(named), engine=engine, pool=cookie_pool(named), secret=SECRET
    )
    pool = balancer.pools["api"]
    response = httpx.get(f"{server.url}/api/x")
    pinned, value = response.text, pin_of(response)
    assert value is not None
    by_name = {app.name: server for app, server in named}

    pool.drain(by_name[pinned].url)  # draining: pinned sessions finish there
    with httpx.Client(base_url=server.url, cookies={"bk": value}) as client:
        assert {client.get("/api/x").text for _ in range(4)} == {pinned}
    assert pinned not in {httpx.get(f"{server.url}/api/x").text for _ in range(4)}
    pool.enable(by_name[pinned].url)

    by_name[pinned].stop()  # killed: the GET is retried elsewhere, the pin moves
    moved = httpx.get(f"{server.url}/api/x", cookies={"bk": value})
    assert moved.status_code == 200 and moved.text != pinned
    new_value = pin_of(moved)
    assert new_value not in (None, value)
    with httpx.Client(base_url=server.url, cookies={"bk": new_value}) as client:
        assert {client.get("/api/x").text for _ in range(4)} == {moved.text}


@pytest.mark.parametrize("key", ["header:X-Session-ID", "cookie:sessionid"])
def test_session_key_pins_each_session(serve, named, engine, key) -> None:
    pool = {"persistence": {"type": "session", "key": key, "ttl": 60}}
    server, balancer = balanced(serve, urls(named), engine=engine, pool=pool)
    source, name = key.split(":")

    def get(session: str) -> httpx.Response:  # one session's request
        if source == "header":
            return httpx.get(f"{server.url}/api/x", headers={name: session})
        return httpx.get(f"{server.url}/api/x", cookies={name: session})

    first = {f"s{i}": get(f"s{i}").text for i in range(9)}
    assert set(first.values()) == {"a", "b", "c"}, "sessions are spread"
    for _ in range(2):
        assert {s: get(s).text for s in first} == first
    assert all("set-cookie" not in get(s).headers for s in first)
    # without the key: balanced as usual
    assert {httpx.get(f"{server.url}/api/x").text for _ in range(3)} == {"a", "b", "c"}
    assert balancer.store.get("balancekit:session:api:s0") in urls(named)


def test_memory_store_evicts_least_recently_used_at_its_bound() -> None:
    store = MemoryStore("memory://?max_entries=3")
    for key in "abc":
        store.set(key, key.upper(), ttl=60)
    assert store.get("a") == "A"  # now b is the least recently used
    store.set("d", "D", ttl=60)
    assert [store.get(k) for k in "abcd"] == ["A", None, "C", "D"]
    with pytest.raises(ValueError, match="max_entries must be a positive integer"):
        MemoryStore("memory://?max_entries=0")


def test_memory_store_ttl_slides_on_read(monkeypatch) -> None:
    now = [1000.0]
    monkeypatch.setattr("balancekit.stores.memory.time.monotonic", lambda: now[0])
    store = MemoryStore()
    store.set("k", "v", ttl=10)
    now[0] += 8
    assert store.get("k", ttl=10) == "v"  # renewed to 1018
    now[0] += 8
    assert store.get("k") == "v"
    now[0] += 3
    assert store.get("k") is None


@pytest.mark.parametrize(
    ("persistence", "message"),
    [
        ({"type": "session"}, "pools.api.persistence.key: is required"),
        ({"type": "session", "key": "query:x"}, "pools.api.persistence.key: must be 'cookie:"),
        ({"type": "session", "key": "header:X", "ttl": -1}, "persistence.ttl: must be a positive"),
        ({"type": "cookie", "name": "a b"}, "pools.api.persistence.name: must be a cookie name"),
        ({"type": "cookie", "max_age": "1h"}, "persistence.max_age: must be a positive"),
        ({"type": "cookie", "domain": "x"}, "pools.api.persistence.domain: unknown key"),
        ({"type": "sticky"}, "unknown persistence 'sticky'"),
    ],
)
def test_persistence_configuration_errors(persistence, message) -> None:
    config = {
        "secret": SECRET,
        "pools": {"api": {"backends": ["http://10.0.0.1"], "persistence": persistence}},
    }
    with pytest.raises(ConfigError) as caught:
        Balancer(config)
    assert message in str(caught.value)


def test_cookie_persistence_without_a_secret_fails_at_start_up() -> None:
    config = {"pools": {"api": {"backends": ["http://10.0.0.1"], "persistence": "cookie"}}}
    with pytest.raises(ConfigError, match="set the top-level 'secret'"):
        Balancer(config)


# --- Redis ---------------------------------------------------------------------------


def test_redis_store_round_trip_and_sliding_ttl(redis_url) -> None:
    balancer = Balancer({"store": redis_url, "pools": {}})
    store = balancer.store
    store.set("k", "v", ttl=5)
    assert store.get("k", ttl=60) == "v"
    import redis

    client = redis.Redis.from_url(redis_url)
    assert client.pttl("k") > 50_000  # renewed by the read
    client.close()
    store.close()


def test_a_redis_store_that_cannot_be_reached_raises_store_error_without_its_password() -> None:
    from balancekit import StoreError
    from balancekit.stores.redis import RedisStore

    store = RedisStore(f"redis://:hunter2@127.0.0.1:{free_port()}/0")
    try:
        with pytest.raises(StoreError) as raised:
            store.set("k", "v", ttl=5)
        assert "hunter2" not in str(raised.value) and "127.0.0.1" in str(raised.value)

        async def read() -> None:
            try:
                with pytest.raises(StoreError):
                    await store.aget("k")
            finally:
                await store.aclose()

        asyncio.run(read())
    finally:
        store.close()


def balancer_toml(tmp_path: Path, name: str, backends: list[str], store: str) -> Path:
    path = tmp_path / f"{name}.toml"
    listed = ", ".join(f'"{u}"' for u in backends)
    path.write_text(
        f'secret = "{SECRET}"\nstore = "{store}"\n'
        f"[pools.api]\nbackends = [{listed}]\n"
        'persistence = { type = "session", key = "header:X-Session-ID", ttl = 60 }\n'
        "[pools.web]\n"
        f"backends = [{listed}]\n"
        'algorithm = "random"\n'
        'persistence = { type = "cookie", name = "bk" }\n'
        '[[routes]]\nprefix = "/api/"\npool = "api"\n'
        '[[routes]]\nprefix = "/web/"\npool = "web"\n'
    )
    return path


@contextmanager
def balancekit_serve(config: Path) -> Iterator[str]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "balancekit", "serve", str(config), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                httpx.get(url + "/")
                break
            except httpx.ConnectError:
                assert process.poll() is None, "balancekit serve exited"
                assert time.monotonic() < deadline
                time.sleep(0.05)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_two_balancer_processes_sharing_secret_and_redis_agree(named, redis_url, tmp_path) -> None:
    config = balancer_toml(tmp_path, "shared", urls(named), redis_url)
    with balancekit_serve(config) as one, balancekit_serve(config) as two:
        sessions = [f"user-{i}" for i in range(12)]
        chosen = {}
        for i, session in enumerate(sessions):  # each session starts on either process
            first = (one, two)[i % 2]
            chosen[session] = httpx.get(f"{first}/api/x", headers={"X-Session-ID": session}).text
        assert set(chosen.values()) == {"a", "b", "c"}
        for front in (one, two, one):
            seen = {
                s: httpx.get(f"{front}/api/x", headers={"X-Session-ID": s}).text for s in sessions
            }
            assert seen == chosen
        # a cookie pin made by one process is honoured by the other
        web = httpx.get(f"{one}/web/x")
        value = pin_of(web)
        assert value is not None
        with httpx.Client(cookies={"bk": value}) as client:
            assert {client.get(f"{two}/web/x").text for _ in range(6)} == {web.text}


def test_redis_stopped_mid_load_fails_no_request_and_stickiness_resumes(
    serve, named, redis_server, monkeypatch, caplog
) -> None:
    monkeypatch.setattr("balancekit.stores.BACKOFF_MAX", 0.5)
    redis_server = redis_server()
    pool = {"persistence": {"type": "session", "key": "header:X-Session-ID", "ttl": 60}}
    server, balancer = balanced(serve, urls(named), pool=pool, store=redis_server.url)
    sessions = [f"s{i}" for i in range(6)]
    failures: list[str] = []
    stop = threading.Event()
    served: Counter[int] = Counter()

    def load() -> None:
        with httpx.Client(base_url=server.url, timeout=5) as client:
            deadline = time.monotonic() + 20
            i = 0
            while not stop.is_set() and time.monotonic() < deadline:
                session = sessions[i % len(sessions)]
                i += 1
                try:
                    response = client.get("/api/x", headers={"X-Session-ID": session})
                except httpx.HTTPError as exc:
                    failures.append(repr(exc))
                    continue
                served[response.status_code] += 1
                if response.status_code != 200:
                    failures.append(response.text)

    def ask(session: str) -> str:
        return httpx.get(f"{server.url}/api/x", headers={"X-Session-ID": session}).text

    pinned = {s: ask(s) for s in sessions}
    with caplog.at_level(logging.WARNING, logger="balancekit"):
        worker = threading.Thread(target=load)
        worker.start()
        time.sleep(0.5)
        redis_server.stop()
        time.sleep(1.5)
        outage = sum(served.values())
        redis_server.start()  # empty: the sessions' pins are gone
        time.sleep(1.5)
        stop.set()
        worker.join(timeout=30)
    print(
        f"\nRedis stopped 1.5 s under load: {sum(served.values())} requests "
        f"({sum(served.values()) - outage} from the outage on), {len(failures)} failed"
    )
    assert not failures, failures[:3]
    assert served[200] > outage > 0
    down = [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(down) == 1, "an outage is logged once, not per request"
    assert any("is back" in r.getMessage() for r in caplog.records)
    # Redis is back: every session is pinned again and stays where it lands.
    now = {s: ask(s) for s in sessions}
    for _ in range(2):
        assert {s: ask(s) for s in sessions} == now
    assert set(pinned) == set(now)
    assert not balancer.store.down


def test_a_password_in_the_url_works_and_never_reaches_the_log(redis_server, caplog) -> None:
    server = redis_server(password="hunter2")
    store = Balancer({"store": server.url, "pools": {}}).store
    store.set("k", "v", ttl=5)
    assert store.get("k") == "v"
    wrong = Balancer({"store": server.url.replace("hunter2", "wrong"), "pools": {}}).store
    with caplog.at_level(logging.ERROR, logger="balancekit"):
        assert wrong.get("k") is None  # refused: logged, not raised
    assert wrong.down
    assert "redis://***@127.0.0.1" in caplog.text and "wrong" not in caplog.text
    store.close()
    wrong.close()
