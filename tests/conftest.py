"""Real servers on 127.0.0.1 for the tests: upstreams and balancers.

Each server runs uvicorn in a thread of the test process on a port the OS
picked, and is stopped (and joined) when its fixture ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from werkzeug.serving import WSGIRequestHandler, make_server

from tests.upstreams import RawServer, make_echo_app

IN_CI = os.environ.get("CI") == "true"


def need(condition: bool, reason: str) -> None:
    """Skip locally, fail in CI, when a service a test needs is missing."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"CI must provide this: {reason}")
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerThread:
    """uvicorn serving ``app`` on 127.0.0.1 in a background thread.

    ``port`` 0 (the default) lets the OS pick one; a given port serves a
    stopped server's address again (a backend that comes back). ``host``:
    another loopback address (DNS tests give several backends one port).
    """

    def __init__(self, app: Any, *, port: int = 0, host: str = "127.0.0.1", **options: Any) -> None:
        # IPPROTO_TCP so that asyncio sets TCP_NODELAY on accepted sockets
        # (see balancekit.cli._bind): else every answer waits ~40 ms.
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self.app = app
        # proxy_headers off: the balancer itself decides whom to believe.
        options = {"log_level": "warning", "lifespan": "auto", "proxy_headers": False, **options}
        self.server = uvicorn.Server(uvicorn.Config(app, **options))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]})
        self.thread.daemon = True

    def start(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"server on port {self.port} did not start")
            time.sleep(0.01)
        return self

    def request_exit(self) -> None:
        self.server.should_exit = True

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


class LeanServerThread:
    """``balancekit serve``'s own server (balancekit._server.LeanServer) for
    a BalanceMiddleware, on its own event loop in a background thread;
    ``fast=False`` turns its fast path off (every request on coroutines)."""

    def __init__(self, app: Any, *, port: int = 0, fast: bool = True) -> None:
        self.fast = fast
        self.server: Any = None  # the LeanServer, once started
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = app
        self.started = threading.Event()
        self.loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self.thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _main(self) -> None:
        from balancekit._server import LeanServer

        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = self.server = LeanServer(self.app, fast=self.fast)
        await server.start([self.sock])
        self.started.set()
        await self._stop.wait()
        await server.shutdown(grace=5)

    def start(self) -> LeanServerThread:
        self.thread.start()
        if not self.started.wait(10):
            raise RuntimeError(f"lean server on port {self.port} did not start")
        return self

    def request_exit(self) -> None:
        if self.loop is not None and self._stop is not None and not self.loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop just ended
                self.loop.call_soon_threadsafe(self._stop.set)

    def stop(self) -> None:
        self.request_exit()
        self.thread.join(timeout=10)
        self.sock.close()


class _QuietHandler(WSGIRequestHandler):
    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass


class WSGIServerThread:
    """werkzeug's threaded WSGI server on 127.0.0.1, in a background thread."""

    def __init__(self, app: Any, *, port: int = 0) -> None:
        self.app = app
        self.server = make_server(
            "127.0.0.1", port, app, threaded=True, request_handler=_QuietHandler
        )
        self.port = self.server.server_port
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> WSGIServerThread:
        self.thread.start()
        return self

    def request_exit(self) -> None:
        pass

    def stop(self) -> None:
        self.server.shutdown()
        self.thread.join(timeout=10)
        self.server.server_close()
        balancer = getattr(self.app, "balancer", None)
        if balancer is not None:
            balancer.close()  # its background thread and upstream connections


@pytest.fixture
def serve() -> Iterator[Callable[..., Any]]:
    """Start any ASGI app (or, with ``wsgi=True``, WSGI app) on a free port;
    every one is stopped afterwards."""
    started: list[ServerThread | WSGIServerThread | LeanServerThread] = []

    def start(app: Any, *, wsgi: bool = False, lean: bool = False, **options: Any) -> Any:
        server: ServerThread | WSGIServerThread | LeanServerThread
        if wsgi:
            server = WSGIServerThread(app, **options)
        elif lean:
            server = LeanServerThread(app, **options)
        else:
            server = ServerThread(app, **options)
        server.start()
        started.append(server)
        return server

    yield start
    # Ask every server to exit first, then wait: they shut down side by side.
    for server in started:
        server.request_exit()
    for server in reversed(started):
        server.stop()


@pytest.fixture
def upstreams(serve: Callable[..., ServerThread]) -> list[ServerThread]:
    """Three echo upstreams named a, b and c."""
    return [serve(make_echo_app(name)) for name in ("a", "b", "c")]


@pytest.fixture
def raw_server() -> Iterator[Callable[[str], RawServer]]:
    made: list[RawServer] = []

    def make(mode: str) -> RawServer:
        server = RawServer(mode)
        made.append(server)
        return server

    yield make
    for server in made:
        server.close()


def closed_port_url() -> str:
    """A URL where nothing listens: connecting to it is refused."""
    return f"http://127.0.0.1:{free_port()}"


@pytest.fixture(params=["aiohttp", "httpx", "httptools"])
def transport(request: pytest.FixtureRequest) -> str:
    """Every engine test runs over each async transport."""
    return str(request.param)


#: The proxy suites run on every engine: ASGI over each async transport,
#: WSGI (under werkzeug) over each sync one, and ``serve``'s lean server
#: (with the default transport).
ENGINES = ["aiohttp", "httpx", "httptools", "lean", "wsgi", "wsgi-httpx"]


def asgi_only(engine: str, why: str) -> None:
    if engine.startswith("wsgi"):
        pytest.skip(f"ASGI only: {why}")


def chromium_path() -> str | None:
    return shutil.which("chromium")


#: The machine's Redis, on a database of the tests' own (emptied before and after).
REDIS_URL = os.environ.get("BALANCEKIT_TEST_REDIS", "redis://127.0.0.1:6379/13")


@pytest.fixture
def redis_url() -> Iterator[str]:
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1)
    try:
        client.ping()
    except redis.RedisError as exc:
        client.close()
        need(False, f"Redis at {REDIS_URL}: {exc}")
    client.flushdb()
    yield REDIS_URL
    client.flushdb()
    client.close()


class RedisServer:
    """A throwaway redis-server on a free port, to stop and start at will."""

    def __init__(self, binary: str, password: str = "") -> None:
        self.binary = binary
        self.password = password
        self.port = free_port()
        auth = f":{password}@" if password else ""
        self.url = f"redis://{auth}127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        import redis

        self.process = subprocess.Popen(
            [self.binary, "--bind", "127.0.0.1", "--port", str(self.port)]
            + ["--save", "", "--appendonly", "no", "--daemonize", "no"]
            + (["--requirepass", self.password] if self.password else []),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(
            port=self.port, password=self.password or None, socket_connect_timeout=0.2
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.RedisError:
                assert self.process.poll() is None, "redis-server exited"
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)
        client.close()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)


@pytest.fixture
def redis_server() -> Iterator[Callable[..., RedisServer]]:
    """Start throwaway redis-servers (``password=`` to require one)."""
    binary = shutil.which("redis-server")
    need(binary is not None, "redis-server is not installed")
    assert binary is not None
    started: list[RedisServer] = []

    def start(password: str = "") -> RedisServer:
        server = RedisServer(binary, password)
        server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


ARTIFACTS = Path(__file__).parent / "artifacts"


@pytest.fixture
def browser() -> Iterator[Any]:
    """Debian's headless Chromium through Selenium (no browser download)."""
    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    need(binary is not None and driver is not None, "chromium and chromium-driver not installed")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(binary)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    options.add_argument("--window-size=1280,900")
    chrome = webdriver.Chrome(service=Service(executable_path=str(driver)), options=options)
    chrome.implicitly_wait(5)
    ARTIFACTS.mkdir(exist_ok=True)
    try:
        yield chrome
    finally:
        chrome.quit()
