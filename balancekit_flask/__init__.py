"""balancekit for Flask: ``BalanceKit(app)`` or ``kit.init_app(app)``.

::

    from balancekit_flask import BalanceKit

    app = Flask(__name__)
    app.config["BALANCEKIT"] = "balancekit.toml"     # or a dict of the same schema
    kit = BalanceKit(app)
    kit.proxy("/search/", pool="search")            # a route beside the config's
    kit.proxy("/shop/", split={"shop": 90, "shop_next": 10}, split_key="cookie:uid")

The configuration's routes are served by balancekit's WSGI middleware in
front of Flask; ``kit.proxy`` routes are Flask views, so they go through
the app's (or blueprint's) ``before_request`` hooks, URL prefix and error
handlers like any other view. Everything else is Flask's, untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import click
from flask import Blueprint, Flask, Response, current_app, g, has_app_context, request
from flask.cli import AppGroup

from balancekit import Balancer, BalancerConfig, ConfigError, load_config
from balancekit.adapter import (
    ConfigInput,
    Problem,
    Refuse,
    Route,
    Routed,
    route_from_config,
    with_default_secret,
)
from balancekit.cli import status_table
from balancekit.wsgi import BalanceMiddleware, classify_environ, respond

__all__ = ["BalanceKit"]

EXTENSION = "balancekit"
#: The name of the catch-all part of a ``kit.proxy`` rule.
_REST = "balancekit_path"
_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE"]

cli = AppGroup("balancekit", help="balancekit: pools, backends and their state.")


@cli.command("status")
def _status() -> None:
    """Print every pool's backends with their live state."""
    click.echo(status_table(current_app.extensions[EXTENSION].balancer))


class _Proxy:
    """One ``kit.proxy`` call, validated, remembered until there is an app
    to add it to."""

    def __init__(self, prefix: str, table: dict[str, Any], endpoint: str) -> None:
        self.prefix = "/" + prefix.strip("/")
        #: The route alone in a configuration, validated: ``routes[0]``.
        self.checked = _checked(self.prefix, table)
        self.endpoint = endpoint

    def add_to(self, target: Flask | Blueprint, view: Callable[..., Response]) -> None:
        base = self.prefix.rstrip("/")
        options: dict[str, Any] = {"methods": _METHODS, "view_func": view}
        target.add_url_rule(base or "/", self.endpoint, strict_slashes=False, **options)
        target.add_url_rule(f"{base}/<path:{_REST}>", self.endpoint, **options)


def _checked(prefix: str, table: dict[str, Any]) -> BalancerConfig:
    """A configuration of the route ``table`` alone, checked by the core's
    rules now, so that a mistake fails where ``kit.proxy`` is called.

    The pools it names stand in empty here: whether they exist is known
    only once the view reaches an app and its balancer.
    """
    split = table.get("split")
    names = list(split) if isinstance(split, Mapping) else []
    if table.get("pool") is not None:
        names.append(table["pool"])
    config = {"pools": dict.fromkeys(map(str, names), {}), "routes": [{"prefix": prefix, **table}]}
    try:
        return load_config(config)
    except ConfigError as exc:
        at = f"proxy({prefix!r})"
        raise ConfigError(
            [Problem(p.path.replace("routes[0]", at, 1), p.message) for p in exc.problems]
        ) from None


class _State:
    """What one app knows: its balancer and the routes of its proxy views."""

    def __init__(self, balancer: Balancer) -> None:
        self.balancer = balancer
        # The view's route (its prefix the blueprint's included) by URL rule,
        # built against ``routes_of``: a reload's pools have new terms.
        self.routes: dict[str, Route] = {}
        self.routes_of: BalancerConfig | None = None


class BalanceKit:
    """The Flask extension.

    The configuration comes from ``config=`` or ``balancer=``, else from
    ``app.config["BALANCEKIT"]`` (a dict or a TOML path); its ``secret``
    defaults to the app's ``SECRET_KEY``. A bad configuration is a
    :class:`~balancekit.ConfigError` from ``init_app``, never on a request.
    """

    def __init__(
        self,
        app: Flask | None = None,
        *,
        config: ConfigInput | None = None,
        balancer: Balancer | None = None,
    ) -> None:
        if config is not None and balancer is not None:
            raise TypeError("pass either config= or balancer=, not both")
        self._config = config
        self._balancer = balancer
        self._proxies: list[_Proxy] = []
        self._apps: list[Flask] = []
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        balancer = self._balancer or Balancer(self._config_for(app))
        state = _State(balancer)
        app.extensions[EXTENSION] = self
        app.extensions[f"{EXTENSION}.state"] = state
        app.wsgi_app = BalanceMiddleware(app.wsgi_app, balancer=balancer)  # type: ignore[method-assign]
        app.cli.add_command(cli)
        for proxy in self._proxies:
            self._check_pool(balancer, proxy)
            proxy.add_to(app, self._view_for(proxy))
        self._apps.append(app)

    def _config_for(self, app: Flask) -> ConfigInput:
        source = self._config if self._config is not None else app.config.get("BALANCEKIT")
        if source is None:
            raise ConfigError(
                [Problem("BALANCEKIT", "set app.config['BALANCEKIT'] or pass config= / balancer=")]
            )
        return with_default_secret(source, app.config.get("SECRET_KEY"))

    @property
    def balancer(self) -> Balancer:
        """The balancer of the current app (or of the one app this kit serves)."""
        if has_app_context():
            return self._state(current_app).balancer
        if len(self._apps) == 1:
            return self._state(self._apps[0]).balancer
        raise RuntimeError("BalanceKit.balancer needs an app context (or a single app)")

    @staticmethod
    def _state(app: Any) -> _State:
        state: _State = app.extensions[f"{EXTENSION}.state"]
        return state

    # --- proxy views -------------------------------------------------------------

    def proxy(
        self,
        prefix: str,
        *,
        pool: str | None = None,
        split: Mapping[str, int] | None = None,
        split_key: str | None = None,
        strip_prefix: bool = False,
        rewrite: str | None = None,
        timeouts: Mapping[str, float] | None = None,
        retries: Mapping[str, Any] | None = None,
        blueprint: Blueprint | None = None,
        endpoint: str | None = None,
    ) -> None:
        """Proxy ``prefix`` (and everything under it) to ``pool`` from a Flask view.

        The route's keys are those of a ``[[routes]]`` table: ``pool`` or
        ``split`` (percentages by pool, with an optional ``split_key``),
        ``strip_prefix`` or ``rewrite``, and ``timeouts`` / ``retries`` that
        override the pool's for this view. The rule decides the path and
        takes every method; ``host``, ``methods`` and ``headers`` conditions
        have no place here, because the Flask rule has already matched when
        the view runs. Guard a view with a ``before_request`` hook, or put such
        a route in the configuration instead.

        With ``blueprint=`` the view belongs to the blueprint: its URL prefix
        comes first, its hooks run. Otherwise it is added to every app this
        kit is (or will be) initialised on. A bad key is a ConfigError here;
        an unknown pool is one when the view reaches an app.
        """
        name = endpoint or "balancekit_proxy_" + (prefix.strip("/").replace("/", "_") or "root")
        given = {
            "pool": pool,
            "split": split,
            "split_key": split_key,
            "rewrite": rewrite,
            "timeouts": timeouts,
            "retries": retries,
        }
        table = {
            key: dict(value) if isinstance(value, Mapping) else value
            for key, value in given.items()
            if value is not None
        }
        spec = _Proxy(prefix, {**table, "strip_prefix": strip_prefix}, name)
        if blueprint is not None:
            spec.add_to(blueprint, self._view_for(spec))
            blueprint.record_once(
                lambda setup: self._check_pool(self._state(setup.app).balancer, spec)
            )
            return
        self._proxies.append(spec)
        for app in self._apps:
            self._check_pool(self._state(app).balancer, spec)
            spec.add_to(app, self._view_for(spec))

    @staticmethod
    def _check_pool(balancer: Balancer, spec: _Proxy) -> None:
        known = ", ".join(sorted(balancer.pools)) or "none"
        problems = [
            Problem(f"proxy({spec.prefix!r})", f"unknown pool {name!r} (pools: {known})")
            for name in spec.checked.routes[0].pools
            if name not in balancer.pools
        ]
        if problems:
            raise ConfigError(problems)

    def _view_for(self, spec: _Proxy) -> Callable[..., Response]:
        def view(**kwargs: Any) -> Response:
            return self._serve(spec)

        view.__name__ = spec.endpoint
        return view

    def _serve(self, spec: _Proxy) -> Response:
        state = self._state(current_app)
        environ = request.environ
        captured: list[Any] = []

        def start_response(
            status: str, headers: list[tuple[str, str]], exc_info: Any = None
        ) -> None:
            captured[:] = [status, headers]

        balancer = state.balancer
        body: Iterable[bytes]
        verdict = classify_environ(balancer, environ, _route(state, spec))
        if type(verdict) is Routed:
            g.balancekit_request_id = verdict.request_id_text  # for the app's after_request
            balancer.start_background()
            body = balancer.sync_engine().handle(verdict, environ, start_response)
        else:  # a route is given: the only other verdict is a refusal
            assert type(verdict) is Refuse
            body = respond(start_response, verdict.status, verdict.headers, verdict.body)
        status, headers = captured
        response = current_app.response_class(
            body, status=status, headers=headers, direct_passthrough=True
        )
        if not any(name.lower() == "content-type" for name, _ in headers):
            del response.headers["Content-Type"]  # Flask's default is not the upstream's
        return response


def _route(state: _State, spec: _Proxy) -> Route:
    """The route of this request's rule: its prefix is the whole rule's, a
    blueprint's URL prefix included, so ``strip_prefix`` strips all of it
    and ``rewrite`` replaces all of it."""
    config = state.balancer.config
    if state.routes_of is not config:  # new pools: the routes' terms follow them
        state.routes, state.routes_of = {}, config
    rule = request.url_rule
    key = rule.rule if rule is not None else spec.prefix
    route = state.routes.get(key)
    if route is None:
        prefix = key.split("<", 1)[0].rstrip("/")
        own = spec.checked.routes[0].model_copy(update={"prefix": prefix})
        route = state.routes[key] = route_from_config(own, config.pools)
    return route
