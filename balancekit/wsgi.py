"""``BalanceMiddleware`` for any WSGI app (Flask, Django, Pyramid, Bottle...)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any
from urllib.parse import quote

from ._balancer import Balancer, ConfigInput, balancer_from
from ._engine_sync import Environ, StartResponse, environ_headers, respond
from ._problem import bad_request
from ._routing import BadPath, normalize_path
from .status import StatusEndpoint

__all__ = ["BalanceMiddleware"]

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
        status = self.balancer.config.status
        self.status = StatusEndpoint(self.balancer) if status.enabled else None

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        # This process's first request starts its health checks: after a
        # pre-fork server forked, so that every worker runs its own.
        self.balancer.start_background()
        raw_text = request_path(environ)
        try:
            raw_path, path = normalize_path(raw_text)
        except (BadPath, UnicodeDecodeError) as exc:
            if isinstance(exc, UnicodeDecodeError) and not self.balancer.routes.covers_raw(
                raw_text
            ):
                return self.app(environ, start_response)  # type: ignore[no-any-return]
            return respond(start_response, *bad_request(str(exc)))
        if self.status is not None and self.status.matches(path):
            answer = self.status.respond(
                path,
                environ.get("REMOTE_ADDR", ""),
                environ_headers(environ),
                environ.get("QUERY_STRING", ""),
            )
            return respond(start_response, *answer)
        route = self.balancer.routes.match(path)
        if route is None:
            return self.app(environ, start_response)  # type: ignore[no-any-return]
        return self.balancer.sync_engine().handle(route, path, raw_path, environ, start_response)
