"""Fuzz the httptools transport's response path: bytes from a hostile backend.

    python fuzz/fuzz_response.py -max_total_time=60

Each input is split in two at its first byte's value and fed to one upstream
connection (a real socket pair, so pause/resume and close are real), then
the connection ends. Whatever the bytes, the client must end in a response
(status 100-999, lower-case header names, the body read to its end) or in
one of balancekit's ProxyErrors: any other exception is a crash.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import socket
import sys

import atheris

# Only balancekit is instrumented (see fuzz_request.py).
with atheris.instrument_imports(include=["balancekit"]):
    from balancekit._exceptions import ProxyError
    from balancekit._transports.httptools import HttptoolsResponse, _Connection

LOOP = asyncio.new_event_loop()


async def _read_all(response: HttptoolsResponse) -> bytes:
    body = bytearray()
    while chunk := await response.read():
        body += chunk
    await response.aclose()
    return bytes(body)


def one_input(data: bytes) -> None:
    if not data:
        return
    cut = data[0] % max(len(data), 1)
    payload = data[1:]
    ours, theirs = socket.socketpair()
    conn = _Connection(LOOP, memoryview(bytearray(1024)))
    transport, _ = LOOP.run_until_complete(LOOP.connect_accepted_socket(lambda: conn, sock=ours))
    try:
        conn.start()
        conn.data_received(payload[:cut])
        conn.data_received(payload[cut:])
        conn.connection_lost(None)
        if not conn.head.done():
            return  # no complete head: the caller's read timeout ends it
        if conn.head.exception() is not None:
            assert isinstance(conn.head.exception(), ProxyError), conn.head.exception()
            return
        assert 100 <= conn.status <= 999, conn.status
        assert all(name == name.lower() for name, _ in conn.headers)
        response = HttptoolsResponse(conn, 1.0, collections.deque(), False)
        with contextlib.suppress(ProxyError):
            LOOP.run_until_complete(asyncio.wait_for(_read_all(response), 1.0))
    finally:
        transport.close()
        theirs.close()
        LOOP.run_until_complete(asyncio.sleep(0))


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
