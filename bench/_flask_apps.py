"""The WSGI apps the Flask benchmark runs under gunicorn (``--chdir bench``).

All read the backends from ``$BENCH_BACKENDS`` (comma-separated URLs).

``balancekit_app``: a Flask app with ``BalanceKit(app)`` and a configuration
route for every path, so balancekit's WSGI middleware in front of Flask
proxies each request (round robin) and Flask itself is never reached.

``balancekit_view_app``: the same pool served from a ``kit.proxy("/")`` Flask
view (no configuration route), so each request goes through Flask's routing,
request context and ``Response`` as any view does.

``reference_app``: a minimal hand-written Flask proxy view with urllib3, the
client balancekit's sync engine uses; the yardstick for what Flask does with
the same client and none of balancekit's features. It is kept honest, doing
the work any real proxy must do: method, path, query, headers and body go
upstream (hop-by-hop headers dropped, Host set to the backend's,
X-Forwarded-For and -Proto added, no headers invented by urllib3); status,
headers and the streamed body come back (hop-by-hop, Date and Server dropped,
as gunicorn writes its own), and the upstream connection goes back to its
pool when the response is done.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Iterator
from typing import IO, Any
from urllib.parse import quote, urlsplit

import urllib3
from flask import Flask, Response, request
from urllib3.util import SKIP_HEADER

from balancekit_flask import BalanceKit

BACKENDS = [u for u in os.environ.get("BENCH_BACKENDS", "").split(",") if u]
METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE"]
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
REQUEST_DROP = HOP_BY_HOP | {"host", "x-forwarded-for", "x-forwarded-proto"}
RESPONSE_DROP = HOP_BY_HOP | {"date", "server"}
READ_SIZE = 64 * 1024


# --- balancekit ---------------------------------------------------------------------


def _balancekit(name: str, *, as_view: bool) -> Flask:
    app = Flask(name)
    routes = [] if as_view else [{"prefix": "/", "pool": "api"}]
    app.config["BALANCEKIT"] = {"pools": {"api": {"backends": BACKENDS}}, "routes": routes}
    kit = BalanceKit(app)
    if as_view:
        kit.proxy("/", pool="api")
    return app


balancekit_app = _balancekit("balancekit_app", as_view=False)
balancekit_view_app = _balancekit("balancekit_view_app", as_view=True)


# --- the hand-written reference -----------------------------------------------------


class _Upstream:
    """One backend: its urllib3 pool and the Host header to send it."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        host = parts.hostname or "127.0.0.1"
        port = parts.port or 80
        self.host = f"{host}:{port}"
        self.pool = urllib3.HTTPConnectionPool(
            host,
            port,
            maxsize=100,
            block=False,
            retries=False,
            timeout=urllib3.Timeout(connect=5.0, read=60.0),
        )


_UPSTREAMS = [_Upstream(url) for url in BACKENDS]
_NEXT = itertools.cycle(_UPSTREAMS)
_NEXT_LOCK = threading.Lock()

reference_app = Flask("reference_app")


def _request_body(stream: IO[bytes]) -> Iterator[bytes]:
    while chunk := stream.read(READ_SIZE):
        yield chunk


class _Relay:
    """The response body: upstream chunks as they arrive; ``close()`` (called
    by the server when it is done, early or not) gives the connection back."""

    __slots__ = ("_done", "_response")

    def __init__(self, response: urllib3.BaseHTTPResponse) -> None:
        self._response = response
        self._done = False

    def __iter__(self) -> _Relay:
        return self

    def __next__(self) -> bytes:
        chunk = self._response.read1(READ_SIZE)
        if not chunk:
            self._done = True
            raise StopIteration
        return chunk

    def close(self) -> None:
        if not self._done:  # unread bytes would answer the next request
            self._response.close()
        self._response.release_conn()


def _target(environ: dict[str, Any]) -> str:
    """Path and query as the client sent them (gunicorn keeps ``RAW_URI``)."""
    raw = environ.get("RAW_URI")
    if isinstance(raw, str) and raw.startswith("/") and not environ.get("SCRIPT_NAME"):
        return raw
    path = quote(environ.get("PATH_INFO", "").encode("latin-1"), safe="/;=,@!$&'()*+:~") or "/"
    query = environ.get("QUERY_STRING", "")
    return f"{path}?{query}" if query else path


@reference_app.route("/", defaults={"path": ""}, methods=METHODS)
@reference_app.route("/<path:path>", methods=METHODS)
def reference_view(path: str) -> Response:
    with _NEXT_LOCK:
        upstream = next(_NEXT)
    headers = urllib3.HTTPHeaderDict()
    headers["Host"] = upstream.host
    for name, value in request.headers.items():
        if name.lower() not in REQUEST_DROP:
            headers.add(name, value)
    headers["X-Forwarded-For"] = request.remote_addr or "unknown"
    headers["X-Forwarded-Proto"] = request.scheme
    # urllib3 would invent these when the client sent none.
    if "User-Agent" not in headers:
        headers["User-Agent"] = SKIP_HEADER
    if "Accept-Encoding" not in headers:
        headers["Accept-Encoding"] = SKIP_HEADER
    environ = request.environ
    length = environ.get("CONTENT_LENGTH")
    chunked = "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
    has_body = bool(length and length != "0") or chunked
    upstream_response = upstream.pool.urlopen(
        request.method,
        _target(environ),
        body=_request_body(request.stream) if has_body else None,
        headers=headers,
        chunked=chunked and not length,
        preload_content=False,
        decode_content=False,
        redirect=False,
        retries=False,
        release_conn=False,
        assert_same_host=False,
    )
    response_headers = [
        (name, value)
        for name, value in upstream_response.headers.items()
        if name.lower() not in RESPONSE_DROP
    ]
    response = Response(
        _Relay(upstream_response),
        status=upstream_response.status,
        headers=response_headers,
        direct_passthrough=True,
    )
    if not any(name.lower() == "content-type" for name, _ in response_headers):
        del response.headers["Content-Type"]  # Flask's default is not the upstream's
    return response
