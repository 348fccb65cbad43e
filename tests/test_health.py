"""Active health checks against real upstreams whose health we switch."""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

import httpx
import pytest

from balancekit import Backend, Balancer
from balancekit.asgi import BalanceMiddleware
from balancekit.health.http import HTTPHealthCheck
from tests.helpers import app_fallback
from tests.upstreams import SocketServer, make_echo_app


class Switchable:
    """An upstream whose /healthz answers 200 or 503, as ``healthy`` says."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.healthy = True
        self.probes = 0

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        probe = scope["path"] == "/healthz"
        self.probes += probe
        status = 503 if probe and not self.healthy else 200
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": self.name.encode()})


def switchable(name: str) -> Any:
    return Switchable(name)


def wait_for(predicate, timeout: float = 5.0) -> float:
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < timeout, "condition not reached in time"
        time.sleep(0.02)
    return time.monotonic() - started


@pytest.mark.parametrize("lifespan", ["on", "off"], ids=["lifespan", "first-request"])
def test_unhealthy_backend_leaves_and_returns(serve, lifespan) -> None:
    a, b = serve(switchable("a")), serve(switchable("b"))
    balancer = Balancer(
        {
            "pools": {
                "api": {
                    "backends": [a.url, b.url],
                    "health_check": {
                        "type": "http",
                        "path": "/healthz",
                        "interval": 0.1,
                        "timeout": 0.5,
                        "rise": 2,
                        "fall": 2,
                    },
                }
            },
            "routes": [{"prefix": "/", "pool": "api"}],
        }
    )
    server = serve(BalanceMiddleware(app_fallback, balancer=balancer), lifespan=lifespan)
    if lifespan == "off":
        assert httpx.get(server.url + "/x").status_code == 200  # starts the checks
    pool = balancer.pools["api"]
    wait_for(lambda: a.app.probes >= 2)

    a.app.healthy = False
    took = wait_for(lambda: pool.backend(a.url).state.value == "unhealthy")
    assert took < 2 * 0.1 + 0.5 + 0.5  # fall x interval + timeout, plus slack
    with httpx.Client() as client:
        assert {client.get(server.url + "/x").text for _ in range(6)} == {"b"}

    a.app.healthy = True
    wait_for(lambda: pool.backend(a.url).state.value == "healthy")
    with httpx.Client() as client:
        assert {client.get(server.url + "/x").text for _ in range(6)} == {"a", "b"}

    # a backend added at runtime waits for its first passing check
    c = serve(switchable("c"))
    pool.add_backend(c.url)
    assert pool.backend(c.url).state.value == "unhealthy"
    wait_for(lambda: pool.backend(c.url).state.value == "healthy")
    if lifespan == "off":
        # Without lifespan nobody tells the balancer about shutdown: an app
        # served that way closes it itself, in the loop it ran in.
        for loop in list(balancer._engines):
            asyncio.run_coroutine_threadsafe(balancer.aclose(), loop).result(5)


class ConnectionCounter(SocketServer):
    """Accepts and closes: each TCP health probe is one connection."""

    def __init__(self) -> None:
        self.connections = 0
        super().__init__()

    def handle(self, conn: socket.socket) -> None:
        self.connections += 1


def test_aclose_stops_the_checks_in_a_loop_that_goes_on() -> None:
    # The loop keeps running after aclose(), so only a stop that really
    # cancels the probing tasks passes (a closed loop would end them anyway).
    counter = ConnectionCounter()
    config = {"backends": [counter.url], "health_check": {"type": "tcp", "interval": 0.05}}

    async def main() -> tuple[int, int]:
        balancer = Balancer({"pools": {"api": config}})
        await balancer.astart()
        deadline = time.monotonic() + 5
        # The counter moves in the server's threads: polled, as nothing to await.
        while counter.connections < 3 and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.02)  # probing, every 50 ms
        await balancer.aclose()
        await asyncio.sleep(0.15)  # a probe sent just before is counted by now
        stopped = counter.connections
        await asyncio.sleep(0.3)  # six intervals: checks still running would probe
        return stopped, counter.connections

    try:
        stopped, later = asyncio.run(main())
    finally:
        counter.close()
    assert stopped >= 3
    assert later == stopped


def test_http_check_expects_body_text_status_and_sends_headers(serve) -> None:
    upstream = serve(make_echo_app("a"))  # echoes the request as JSON

    async def run(**options: Any) -> bool:
        check = HTTPHealthCheck(path="/healthz", **options)
        try:
            return await check.check(Backend(upstream.url))
        finally:
            await check.aclose()

    assert asyncio.run(run(expect_body='"backend": "a"'))
    assert not asyncio.run(run(expect_body="READY"))
    assert asyncio.run(run(expect_body="api.internal", headers={"Host": "api.internal"}))
    assert not asyncio.run(run(expect_status="500-599"))
    with pytest.raises(ValueError, match="expect_body: must not be empty"):
        HTTPHealthCheck(expect_body="")


def test_a_cancellation_a_store_call_swallowed_still_stops_the_loop() -> None:
    import asyncio
    import contextlib

    from balancekit._coordination import raise_if_cancelled

    rounds = []

    async def checks() -> None:
        while True:
            # a store call, cancelled mid-way and the cancellation swallowed,
            # as redis-py can (redis/redis-py#2028)
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(0.05)
            rounds.append(1)
            raise_if_cancelled()
            await asyncio.sleep(0.05)

    async def main() -> None:
        task = asyncio.get_running_loop().create_task(checks())
        await asyncio.sleep(0.01)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, timeout=2)
        assert task.cancelled()

    asyncio.run(main())
    assert rounds == [1]  # stopped after the round it was cancelled in
