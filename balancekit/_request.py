"""What the decision core knows of a request: no I/O, no framework types."""

from __future__ import annotations

from functools import cached_property
from http.cookies import CookieError, SimpleCookie

from ._types import RawHeaders


class RequestInfo:
    """The request as an algorithm or persistence plugin sees it.

    ``headers`` keeps the raw ASGI pairs; ``header()`` and ``cookies`` decode
    lazily, so a request that no plugin inspects costs nothing extra.
    """

    __slots__ = ("__dict__", "client_ip", "method", "path", "query", "raw_headers", "scheme")

    def __init__(
        self,
        method: str,
        path: str,
        *,
        query: str = "",
        headers: RawHeaders | None = None,
        client_ip: str = "",
        scheme: str = "http",
    ) -> None:
        self.method = method
        self.path = path
        self.query = query
        self.raw_headers = headers or []
        self.client_ip = client_ip
        self.scheme = scheme

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (any case), or None."""
        key = name.lower().encode("latin-1")
        for k, v in self.raw_headers:
            if k == key:
                return v.decode("latin-1")
        return None

    @cached_property
    def headers(self) -> dict[str, str]:
        """Headers by lower-case name; repeated headers are joined with ``, ``."""
        out: dict[str, str] = {}
        for k, v in self.raw_headers:
            name, value = k.decode("latin-1").lower(), v.decode("latin-1")
            out[name] = f"{out[name]}, {value}" if name in out else value
        return out

    @cached_property
    def cookies(self) -> dict[str, str]:
        """Cookies of the request; a malformed Cookie header gives what parsed."""
        jar: SimpleCookie = SimpleCookie()
        for k, v in self.raw_headers:
            if k == b"cookie":
                try:
                    jar.load(v.decode("latin-1"))
                except CookieError:
                    continue
        return {name: morsel.value for name, morsel in jar.items()}
