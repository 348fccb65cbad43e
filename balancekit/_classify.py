"""The adapter preamble: what a request is to balancekit, decided without I/O.

Every adapter (the ASGI and WSGI middlewares, Django's, Flask's, and so
``balancekit serve``) asks :meth:`Balancer.classify` first and gets one of:

- :data:`PASS`: not balancekit's; the app behind the adapter has it;
- :class:`Refuse`: answer this problem (a path that climbs above the root,
  unsafe body framing, too many headers) and forward nothing;
- :class:`Status`: the status path; the adapter serves it with
  ``balancer.status_endpoint`` once it knows who asks;
- :class:`Admin`: the admin API; the adapter reads the body and serves it
  with ``balancer.admin_endpoint.respond(method, raw_path, ...)``;
- :class:`Routed`: proxy it: the route, its pool, the request as plugins
  see it, the upstream target and the headers to forward, all worked out
  here so that an engine only moves bytes.

The order of the checks is the order of :func:`classify`; the route match
reads the headers only when a route has a host, method or header condition.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ._engine_core import inspect_request, refusal_status
from ._forwarding import upstream_request_headers
from ._problem import problem
from ._request import RequestInfo
from ._routing import BadPath, normalize_path

if TYPE_CHECKING:
    from ._admin import AdminEndpoint
    from ._config import RetriesConfig, TimeoutsConfig
    from ._forwarding import TrustedProxies
    from ._pool import Pool
    from ._routing import Route, RouteTable
    from ._tracing import Tracing
    from ._types import RawHeaders
    from .status import StatusEndpoint


class Pass:
    """Not balancekit's request: the adapter hands it to its app."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "PASS"


#: The one :class:`Pass`.
PASS = Pass()


@dataclass(frozen=True, slots=True)
class Refuse:
    """Answer this problem and forward nothing."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


@dataclass(frozen=True, slots=True)
class Status:
    """A request for the status path (``path`` normalised)."""

    path: str


@dataclass(frozen=True, slots=True)
class Admin:
    """A request for the admin API; ``raw_path`` as sent (a backend's URL
    is one percent-encoded segment of it)."""

    raw_path: str


class Routed:
    """A request to proxy, with everything the engines need worked out.

    ``request`` is what algorithms and persistence see; ``pool`` the pool
    the route (or its split) chose; ``target`` the upstream request target
    (the route's upstream path and the query); ``headers`` the forwarded
    header block, Host first (the backend's is put in its place per try
    unless the pool preserves the client's); ``has_body`` whether the
    request framing announces a body; ``timeouts`` and ``retries`` the
    pool's terms, or the route's where it overrides them.
    """

    __slots__ = (
        "access_log",
        "has_body",
        "headers",
        "pool",
        "request",
        "request_id",
        "retries",
        "route",
        "target",
        "timeouts",
        "tracing",
    )

    def __init__(
        self,
        route: Route,
        pool: Pool,
        request: RequestInfo,
        target_path: str,
        headers: RawHeaders,
        has_body: bool,
        access_log: bool | str,
    ) -> None:
        self.route = route
        self.pool = pool
        self.request = request
        query = request.query
        self.target = target_path + (f"?{query}" if query else "")
        self.headers = headers
        self.has_body = has_body
        self.access_log = access_log
        #: (header name, value) of the request id, sent upstream and back.
        self.request_id: tuple[bytes, bytes] | None = None
        self.tracing: Tracing | None = None
        terms = route.terms.get(pool.name) if route.terms else None
        if terms is None:
            self.timeouts: TimeoutsConfig = pool.timeouts
            self.retries: RetriesConfig = pool.retries
        else:
            self.timeouts, self.retries = terms

    @property
    def request_id_text(self) -> str | None:
        """The request's id (``request_id``), for an adapter to hand its app."""
        return None if self.request_id is None else self.request_id[1].decode("ascii")

    def __repr__(self) -> str:
        return f"Routed({self.request.method} {self.target!r} -> pool {self.pool.name!r})"


Classification = Pass | Refuse | Status | Admin | Routed


@dataclass(frozen=True, slots=True)
class Model:
    """What classifying reads, replaced as a whole on a reload so that a
    request never sees the new routes with the old pools."""

    routes: RouteTable
    pools: dict[str, Pool]
    trusted_proxies: TrustedProxies
    access_log: bool | str
    status: StatusEndpoint | None
    #: The request id header, lower case (b"" for none).
    request_id: bytes = b""
    #: Spans per try, with ``tracing = true``.
    tracing: Tracing | None = None
    #: The admin HTTP API, with ``[admin] enabled``.
    admin: AdminEndpoint | None = None


def classify(
    model: Model,
    method: str,
    raw_path: str,
    headers: RawHeaders | Callable[[], RawHeaders],
    query: str,
    client_ip: str,
    scheme: str,
    http_version: str,
    route: Route | None,
) -> Classification:
    """See :meth:`balancekit.Balancer.classify` (positional: it is on every
    request's path)."""
    try:
        upstream_path, path = normalize_path(raw_path)
    except (BadPath, UnicodeDecodeError) as exc:
        if isinstance(exc, UnicodeDecodeError) and (
            route is None and not model.routes.covers_raw(raw_path)
        ):
            return PASS  # not UTF-8, and not ours: the app decides what it means
        return Refuse(*problem(400, str(exc), close=True))
    if route is None:
        admin = model.admin
        if admin is not None and admin.matches(path):  # before the status path: it may be inside
            return Admin(raw_path)
        status = model.status
        if status is not None and status.matches(path):
            return Status(path)
        routes = model.routes
        if routes.needs_headers:  # a host, method or header decides
            if callable(headers):
                headers = headers()
            route = routes.match(path, method, headers)
        else:
            route = routes.match(path)
        if route is None:
            return PASS
    if callable(headers):
        headers = headers()
    has_body, refused = inspect_request(headers, http_version)
    if refused is not None:
        return Refuse(*problem(refusal_status(refused), f"refused: {refused}", close=True))
    request = RequestInfo(
        method, path, query=query, headers=headers, client_ip=client_ip, scheme=scheme
    )
    name = route.choose_pool(request) if route.split else route.pool
    pool = model.pools.get(name)
    if pool is None:  # an adapter's own route, to a pool a reload removed
        return Refuse(*problem(503, "no such pool", pool=name))
    forwarded = upstream_request_headers(
        headers,
        client_ip=client_ip or "unknown",
        scheme=scheme,
        trusted=bool(model.trusted_proxies.networks) and client_ip in model.trusted_proxies,
        host=None if pool.config.preserve_host else b"",
        request_id=model.request_id,
    )
    target_path = route.upstream_path(upstream_path)
    if target_path is None:
        detail = "an encoded slash in the prefix this route replaces"
        return Refuse(*problem(400, detail, close=True))
    routed = Routed(route, pool, request, target_path, forwarded, has_body, model.access_log)
    if model.request_id:
        routed.request_id = forwarded[-1]  # upstream_request_headers puts it last
    routed.tracing = model.tracing
    return routed
