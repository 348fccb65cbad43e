"""WebSocket upgrades on a routed prefix are proxied both ways."""

from __future__ import annotations

import asyncio
import time

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.typing import Subprotocol

from tests.conftest import closed_port_url
from tests.helpers import balanced


def ws_url(server) -> str:
    return server.url.replace("http://", "ws://")


def test_messages_both_ways_and_the_close_code_is_kept(serve, upstreams) -> None:
    server, balancer = balanced(serve, [upstreams[0].url])

    async def talk():
        async with connect(ws_url(server) + "/api/ws", subprotocols=[Subprotocol("chat")]) as ws:
            assert ws.subprotocol == "chat"
            await ws.send("hello")
            assert await ws.recv() == "echo:hello"
            await ws.send(b"\x01\x02\x03")
            assert await ws.recv() == b"\x03\x02\x01"
            await ws.send("bye")
            with pytest.raises(ConnectionClosed) as info:
                await ws.recv()
            return info.value.rcvd.code if info.value.rcvd else None

    assert asyncio.run(talk()) == 4001
    pool = balancer.pools["api"]
    deadline = time.monotonic() + 2  # the proxy finishes its side after the client
    while pool.active_requests and time.monotonic() < deadline:
        time.sleep(0.02)
    assert pool.active_requests == 0
    assert pool.backends[0].requests_total == 1


def test_unrouted_websockets_reach_the_app(serve, upstreams) -> None:
    server, _ = balanced(serve, [upstreams[0].url])

    async def talk():
        async with connect(ws_url(server) + "/elsewhere"):
            pass

    # the fallback app does not accept websockets: the handshake is refused
    with pytest.raises(InvalidStatus):
        asyncio.run(talk())


def test_a_dead_upstream_refuses_the_handshake(serve) -> None:
    server, balancer = balanced(serve, [closed_port_url()])

    async def talk():
        async with connect(ws_url(server) + "/api/ws"):
            pass

    with pytest.raises(InvalidStatus):
        asyncio.run(talk())
    assert balancer.pools["api"].active_requests == 0
    assert balancer.pools["api"].backends[0].failures_total == 1
