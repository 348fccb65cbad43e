"""``BalanceMiddleware`` for any WSGI app (Flask, Django, Pyramid, Bottle...)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any
from urllib.parse import quote

from ._admin import MAX_BODY
from ._balancer import Balancer, ConfigInput, balancer_from
from ._classify import Admin, Classification, Refuse, Routed, Status
from ._engine_sync import Environ, StartResponse, environ_headers, http_version, respond
from ._routing import Route

__all__ = ["BalanceMiddleware", "classify_environ", "environ_headers", "request_path", "respond"]

WSGIApp = Any


def request_path(environ: Environ) -> str:
    """The request's path as the client sent it, percent-encoding kept.

    gunicorn and werkzeug keep the raw target in ``RAW_URI`` /
    ``REQUEST_URI``; other servers give only the decoded ``PATH_INFO``,
    which is encoded again. A ``SCRIPT_NAME`` the app is mounted under is
    not part of the path routes see.
    """
    script = environ.get("SCRIPT_NAME", "")
    raw = environ.get("RAW_URI") or environ.get("REQUEST_URI")
    if raw and not script:
        if raw[0] != "/":  # absolute-form: http://host/path
            slash = raw.find("/", raw.find("//") + 2)
            raw = raw[slash:] if slash > 0 else "/"
        cut = raw.find("?")
        return raw if cut < 0 else raw[:cut]
    return quote(environ.get("PATH_INFO", "").encode("latin-1"), safe="/;=,@!$&'()*+:~") or "/"


class BalanceMiddleware:
    """Proxies requests on the configured routes; everything else reaches ``app``.

    ::

        app.wsgi_app = BalanceMiddleware(app.wsgi_app, config="balancekit.toml")

    The configuration is checked here, when the app is built, so a mistake
    is a :class:`~balancekit.ConfigError` at start-up, never on a request.
    Health checks run in a daemon thread of each worker process, started by
    its first request (so after a pre-fork server has forked) and stopped at
    exit.
    """

    def __init__(
        self,
        app: WSGIApp,
        *,
        config: ConfigInput | None = None,
        balancer: Balancer | None = None,
    ) -> None:
        self.app = app
        self.balancer = balancer_from(config, balancer)

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        balancer = self.balancer
        # This process's first request starts its health checks: after a
        # pre-fork server forked, so that every worker runs its own.
        balancer.start_background()
        verdict = classify_environ(balancer, environ)
        if type(verdict) is Routed:
            return balancer.sync_engine().handle(verdict, environ, start_response)
        if type(verdict) is Refuse:
            return respond(start_response, verdict.status, verdict.headers, verdict.body)
        if type(verdict) is Status:
            endpoint = balancer.status_endpoint
            assert endpoint is not None  # no Status verdict without one
            answer = endpoint.respond(
                verdict.path,
                environ.get("REMOTE_ADDR", ""),
                environ_headers(environ),
                environ.get("QUERY_STRING", ""),
            )
            return respond(start_response, *answer)
        if type(verdict) is Admin:
            admin = balancer.admin_endpoint
            assert admin is not None  # no Admin verdict without one
            answer = admin.respond(
                environ.get("REQUEST_METHOD", "GET"),
                verdict.raw_path,
                environ.get("REMOTE_ADDR", ""),
                environ_headers(environ),
                read_body(environ, MAX_BODY + 1),
            )
            return respond(start_response, *answer)
        return self.app(environ, start_response)  # type: ignore[no-any-return]


def read_body(environ: Environ, limit: int) -> bytes:
    """Up to ``limit`` bytes of the request body (by its Content-Length, or
    to its end where the server says the stream ends, as for chunked)."""
    stream = environ.get("wsgi.input")
    if stream is None:
        return b""
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        length = 0
    if length:
        return bytes(stream.read(min(length, limit)))
    if environ.get("wsgi.input_terminated"):
        return bytes(stream.read(limit))
    return b""


def classify_environ(
    balancer: Balancer, environ: Environ, route: Route | None = None
) -> Classification:
    """:meth:`Balancer.classify` for a WSGI request (see :func:`request_path`)."""
    return balancer.classify(
        environ.get("REQUEST_METHOD", "GET"),
        request_path(environ),
        lambda: environ_headers(environ),
        query=environ.get("QUERY_STRING", ""),
        client_ip=environ.get("REMOTE_ADDR", ""),
        scheme=environ.get("wsgi.url_scheme", "http"),
        http_version=http_version(environ),
        route=route,
    )
