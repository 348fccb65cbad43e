"""Routes: which pool serves a request, and path normalisation.

A route matches by path prefix (whole segments) and optionally by host,
method and headers; it sends to one pool or splits over several. Among the
routes whose every condition holds, the winner is (CONTRACT section 10):
one with ``host`` over one without, an exact host over a wildcard, then the
longest prefix, then one with ``methods`` or ``headers`` over one without,
then the first in the configuration. The table is laid out at start-up in
that order, so a lookup walks it once and stops at the first match.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from .algorithms._keys import KeyFunction, key_function, stable_hash

if TYPE_CHECKING:
    from ._config import PoolConfig, RouteConfig
    from ._request import RequestInfo
    from ._types import RawHeaders

#: Hosts whose table list is remembered; a client picks its Host freely, so
#: the cache is emptied when full rather than allowed to grow.
HOST_CACHE_SIZE = 4096


class BadPath(ValueError):
    """The request path climbs above the root or hides dot segments."""


@dataclass(frozen=True, slots=True, eq=False)
class Route:
    """A prefix (kept without its trailing slash) served by a pool, or split
    over pools, under optional conditions on host, method and headers.

    ``split`` is ``(pool, upper bound)`` pairs, the bounds cumulative
    percentages ending at 100; ``terms`` the route's own timeouts and retry
    terms per pool it sends to, where it overrides the pool's.
    """

    prefix: str
    pool: str
    strip_prefix: bool = False
    host: str | None = None
    methods: frozenset[str] | None = None
    headers: tuple[tuple[bytes, bytes | None], ...] = ()
    split: tuple[tuple[str, int], ...] = ()
    split_key: KeyFunction | None = None
    rewrite: str | None = None
    terms: Mapping[str, tuple[Any, Any]] = field(default_factory=dict)

    @property
    def conditional(self) -> bool:
        """Whether the route asks anything of the method or headers."""
        return self.methods is not None or bool(self.headers)

    def accepts(self, method: str | None, headers: RawHeaders | None) -> bool:
        """Whether the request's method and headers meet the route's conditions."""
        if self.methods is not None and method not in self.methods:
            return False
        for name, value in self.headers:
            for k, v in headers or ():
                if k == name and (value is None or v == value):
                    break
            else:
                return False
        return True

    def choose_pool(self, request: RequestInfo) -> str:
        """The pool for ``request``: the route's, or its side of the split.

        With a ``split_key`` a key's side is a stable hash of the key, the
        same in every process and after a restart; a request without the key
        (and every request without a ``split_key``) is split at random.
        """
        split = self.split
        if not split:
            return self.pool
        key = self.split_key(request) if self.split_key is not None else None
        bucket = stable_hash(key) % 100 if key is not None else random.randrange(100)
        for pool, bound in split:
            if bucket < bound:
                return pool
        return split[-1][0]  # not reached: the bounds end at 100

    def upstream_path(self, raw_path: str) -> str | None:
        """The path sent upstream: ``raw_path`` (normalised, its
        percent-encoding kept) itself, what follows the prefix
        (``strip_prefix``), or that after ``rewrite``.

        The prefix matched the decoded path, so it is cut from the raw one
        by segments, not by length: ``/%61pi/x`` under ``/api`` leaves
        ``/x``. None when the two do not line up (an encoded slash inside
        the prefix): the part to cut is then ambiguous.
        """
        if self.rewrite is None and not self.strip_prefix:
            return raw_path
        prefix = self.prefix
        cut = len(prefix)
        if raw_path[:cut] != prefix:  # percent-encoding inside the prefix
            cut = _segments_end(raw_path, prefix.count("/"))
            if unquote(raw_path[:cut]) != prefix:
                return None
        rest = raw_path[cut:]
        if self.rewrite is not None:
            return (self.rewrite + rest) or "/"
        return rest if rest.startswith("/") else "/" + rest


def _segments_end(path: str, segments: int) -> int:
    """Where the first ``segments`` segments of ``path`` end."""
    at = 0
    for _ in range(segments):
        at = path.find("/", at + 1)
        if at < 0:
            return len(path)
    return at


def _norm_prefix(prefix: str) -> str:
    return prefix.rstrip("/")  # "/" becomes "": the root matches every path


def route_from_config(config: RouteConfig, pools: Mapping[str, PoolConfig]) -> Route:
    """The :class:`Route` of a validated route table, with its own timeouts
    and retry terms resolved against each pool it sends to."""
    if config.split is not None:
        bound = 0
        split = []
        for name, share in config.split.items():
            bound += share
            if share:
                split.append((name, bound))
        first = split[0][0]
    else:
        assert config.pool is not None  # one of the two, by validation
        split, first = [], config.pool
    terms = {}
    for name in config.pools:
        pool = pools.get(name)
        if pool is None or (config.timeouts is None and config.retries is None):
            continue
        timeouts, retries = pool.timeouts, pool.retries
        if config.timeouts is not None:
            timeouts = timeouts.model_copy(update=config.timeouts.model_dump(exclude_none=True))
        if config.retries is not None:
            retries = retries.model_copy(update=config.retries.model_dump(exclude_none=True))
        terms[name] = (timeouts, retries)
    return Route(
        _norm_prefix(config.prefix),
        first,
        config.strip_prefix,
        host=config.host,
        methods=frozenset(config.methods) if config.methods is not None else None,
        headers=tuple(
            (name.lower().encode("latin-1"), None if value == "*" else value.encode("latin-1"))
            for name, value in (config.headers or {}).items()
        ),
        split=tuple(split),
        split_key=key_function(config.split_key) if config.split_key else None,
        rewrite=None if config.rewrite is None else _norm_prefix(config.rewrite),
        terms=terms,
    )


class _Table:
    """The routes of one host (or of none): candidates per prefix, in order
    of precedence (conditional ones first, then configuration order)."""

    __slots__ = ("conditional", "prefixes")

    def __init__(self, routes: Sequence[Route]) -> None:
        by_prefix: dict[str, list[Route]] = {}
        for route in routes:
            by_prefix.setdefault(route.prefix, []).append(route)
        self.prefixes: dict[str, tuple[Route, ...]] = {
            prefix: tuple(sorted(group, key=lambda r: not r.conditional))  # stable
            for prefix, group in by_prefix.items()
        }
        self.conditional = any(r.conditional for r in routes)

    def match(self, path: str, method: str | None, headers: RawHeaders | None) -> Route | None:
        # Walk up the path one segment at a time, a dict probe per step: the
        # cost grows with the path's depth, not with the number of routes.
        prefixes = self.prefixes
        candidate = path
        while True:
            routes = prefixes.get(candidate)
            if routes is not None:
                for route in routes:
                    if route.accepts(method, headers):
                        return route
            cut = candidate.rfind("/")
            if cut < 0:
                return None
            candidate = candidate[:cut]


def request_host(headers: RawHeaders | None) -> bytes | None:
    """The request's Host field as sent, or None."""
    for name, value in headers or ():
        if name == b"host":
            return value
    return None


def host_name(raw: bytes) -> str:
    """A Host field's host, lower-case, without port or trailing dot."""
    host = raw.decode("latin-1").strip().lower()
    if host.startswith("["):  # an IPv6 literal keeps its brackets
        return host[: host.find("]") + 1] or host
    name, colon, port = host.rpartition(":")
    if colon and (port.isdigit() or not port):
        host = name
    return host.rstrip(".")


class RouteTable:
    """Every route, laid out for lookups in order of precedence.

    Prefixes match whole path segments: ``/api`` and ``/api/`` both match
    ``/api``, ``/api/`` and ``/api/x``, never ``/apix``. A table of plain
    prefix routes (no host, method or header) is looked up with one dict
    probe per path segment and never looks at the headers; hosts add one
    cached dict probe to find the tables that apply.
    """

    def __init__(self, routes: Iterable[Route] = ()) -> None:
        self._routes = [
            r if r.prefix == _norm_prefix(r.prefix) else replace(r, prefix=_norm_prefix(r.prefix))
            for r in routes
        ]
        exact: dict[str, list[Route]] = {}
        wild: dict[str, list[Route]] = {}
        plain: list[Route] = []
        for route in self._routes:
            if route.host is None:
                plain.append(route)
            elif route.host.startswith("*."):
                wild.setdefault(route.host[1:], []).append(route)  # ".example.com"
            else:
                exact.setdefault(route.host, []).append(route)
        self._default = _Table(plain)
        self._exact = {host: _Table(group) for host, group in exact.items()}
        # The longest (most specific) suffix first.
        self._wild = sorted(
            ((suffix, _Table(group)) for suffix, group in wild.items()),
            key=lambda item: -len(item[0]),
        )
        self._by_host: dict[bytes | None, tuple[_Table, ...]] = {}
        self._prefixes = {route.prefix for route in self._routes}
        #: Whether a lookup must see the headers (a host, method or header
        #: condition); without, :meth:`match` needs the path alone.
        self.needs_headers = bool(exact or wild or self._default.conditional)
        #: Without conditions, the route of each prefix (the first given):
        #: a lookup is then a dict probe per path segment and nothing else.
        self._plain = {prefix: group[0] for prefix, group in self._default.prefixes.items()}

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._routes)

    def __len__(self) -> int:
        return len(self._routes)

    def match(
        self, path: str, method: str | None = None, headers: RawHeaders | None = None
    ) -> Route | None:
        """The route for a request (``path`` normalised), or None."""
        if not self.needs_headers:
            # The common case, kept as lean as the prefix-only table was.
            plain = self._plain
            if not plain:
                return None
            candidate = path
            while True:
                route = plain.get(candidate)
                if route is not None:
                    return route
                cut = candidate.rfind("/")
                if cut < 0:
                    return None
                candidate = candidate[:cut]
        for table in self._tables(request_host(headers)):
            route = table.match(path, method, headers)
            if route is not None:
                return route
        return None

    def _tables(self, raw_host: bytes | None) -> tuple[_Table, ...]:
        tables = self._by_host.get(raw_host)
        if tables is not None:
            return tables
        found = []
        if raw_host is not None and (self._exact or self._wild):
            host = host_name(raw_host)
            if host in self._exact:
                found.append(self._exact[host])
            found += [table for suffix, table in self._wild if host.endswith(suffix)]
        found.append(self._default)
        if len(self._by_host) >= HOST_CACHE_SIZE:
            self._by_host.clear()
        tables = self._by_host[raw_host] = tuple(found)
        return tables

    def covers_raw(self, raw_path: str) -> bool:
        """Whether a route's prefix covers a raw path that is not valid
        UTF-8 (a lenient decode is enough to tell): if none does, the app
        decides what such a path means."""
        candidate = unquote(raw_path, errors="surrogateescape")
        prefixes = self._prefixes
        while True:
            if candidate in prefixes:
                return True
            cut = candidate.rfind("/")
            if cut < 0:
                return False
            candidate = candidate[:cut]


def remove_dot_segments(path: str) -> str:
    """Resolve ``.`` and ``..`` segments (RFC 3986 section 5.2.4).

    Raises :class:`BadPath` when ``..`` would climb above the root, instead
    of clamping it there as the RFC does: such a path is an attack or a bug,
    and it is answered 400, never forwarded.
    """
    if "/." not in path:
        return path
    out: list[str] = []
    segments = path.split("/")
    # segments[0] is "" for an absolute path
    for i, segment in enumerate(segments[1:], start=1):
        last = i == len(segments) - 1
        if segment == ".":
            if last:
                out.append("")
        elif segment == "..":
            if not out:
                raise BadPath(f"path climbs above the root: {path!r}")
            out.pop()
            if last:
                out.append("")
        else:
            out.append(segment)
    return "/" + "/".join(out)


def normalize_path(raw_path: str) -> tuple[str, str]:
    """The request target's path, normalised: ``(raw, decoded)``.

    ``raw`` keeps its percent-encoding and is what goes upstream; ``decoded``
    is what routes match. Percent-encoded dots count as dots (RFC 3986
    section 6.2.2.2), so ``/api/%2e%2e/admin`` cannot slip past a route. A
    decoded path that still holds dot segments (from ``%2F``) is refused, so
    that the route and the backend cannot read the path differently.

    A target that is not a path (``OPTIONS *``, or garbage) is returned as
    it is: no route can match it (every prefix starts with "/"), so it is
    the app's to answer, and its dots are never resolved into one that could.
    """
    if raw_path[:1] != "/":
        return raw_path, raw_path
    if "%" not in raw_path:
        resolved = remove_dot_segments(raw_path) if "/." in raw_path else raw_path
        return resolved, resolved
    raw = raw_path.replace("%2e", ".").replace("%2E", ".")
    resolved = remove_dot_segments(raw)
    decoded = unquote(resolved, errors="strict") if "%" in resolved else resolved
    if "/." in decoded and remove_dot_segments(decoded) != decoded:
        raise BadPath(f"path hides dot segments behind an encoded slash: {raw_path!r}")
    return resolved, decoded
