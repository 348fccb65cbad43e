"""Routes: segment-aware longest-prefix matching, and path normalisation."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import unquote


class BadPath(ValueError):
    """The request path climbs above the root or hides dot segments."""


@dataclass(frozen=True, slots=True)
class Route:
    """A prefix served by a pool. ``prefix`` is kept without its trailing slash."""

    prefix: str
    pool: str
    strip_prefix: bool = False

    def upstream_path(self, path: str) -> str:
        """The path sent upstream: ``path`` itself, or what follows the prefix."""
        if not self.strip_prefix:
            return path
        rest = path[len(self.prefix) :]
        return rest if rest.startswith("/") else "/" + rest


def _norm_prefix(prefix: str) -> str:
    return prefix.rstrip("/")  # "/" becomes "": the root matches every path


class RouteTable:
    """Longest matching prefix wins; prefixes match whole path segments.

    ``/api`` and ``/api/`` both match ``/api``, ``/api/`` and ``/api/x``,
    never ``/apix``. A lookup walks up the path one segment at a time with a
    dict probe per step, so its cost grows with the path's depth, not with
    the number of routes.
    """

    def __init__(self, routes: Iterable[Route] = ()) -> None:
        self._routes: dict[str, Route] = {}
        for route in routes:
            self.add(route)

    def add(self, route: Route) -> None:
        prefix = _norm_prefix(route.prefix)
        self._routes[prefix] = Route(prefix, route.pool, route.strip_prefix)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._routes.values())

    def __len__(self) -> int:
        return len(self._routes)

    def match(self, path: str) -> Route | None:
        routes = self._routes
        if not routes:
            return None
        candidate = path
        while True:
            route = routes.get(candidate)
            if route is not None:
                return route
            cut = candidate.rfind("/")
            if cut < 0:
                return None
            candidate = candidate[:cut]

    def covers_raw(self, raw_path: str) -> bool:
        """Whether a route covers a raw path that is not valid UTF-8 (a
        lenient decode is enough to tell): if none does, the app decides
        what such a path means."""
        return self.match(unquote(raw_path, errors="surrogateescape")) is not None


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
        resolved = remove_dot_segments(raw_path)
        return resolved, resolved
    raw = raw_path.replace("%2e", ".").replace("%2E", ".")
    resolved = remove_dot_segments(raw)
    decoded = unquote(resolved, errors="strict") if "%" in resolved else resolved
    if "/." in decoded and remove_dot_segments(decoded) != decoded:
        raise BadPath(f"path hides dot segments behind an encoded slash: {raw_path!r}")
    return resolved, decoded
