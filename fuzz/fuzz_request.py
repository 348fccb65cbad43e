"""Fuzz the request path: bytes from a hostile client, through the parser
the lean server uses and every function that turns a request into the one
sent upstream.

    python fuzz/fuzz_request.py -max_total_time=60

The parser is set up as the lean server sets it (any HTTP/1.x version is
parsed) and each message of a pipelined input is checked on its own, its
trailer fields left out as the server leaves them out (RFC 9110 6.5.1).

Invariants, whatever the bytes: the parser either refuses the request or
yields one; a path either normalises (to one that holds no dot segment,
or, when it does not start with "/", to one no route matches) or is
refused with BadPath/UnicodeDecodeError; framing checks never raise, and
a request they let through names exactly one Host (at most one in
HTTP/1.0), has no Content-Length beside Transfer-Encoding and no
Transfer-Encoding in HTTP/1.0 (RFC 9112 3.2, 6.1, 6.3); the upstream
headers hold exactly one Host, no hop-by-hop field, and no X-Forwarded-*
from an untrusted client but ours.
"""

from __future__ import annotations

import contextlib
import sys

import atheris
import httptools

# Only balancekit is instrumented: its dependencies (pydantic, pluggy and
# the standard library modules they pull in) would take seconds to rewrite
# and add nothing the harness wants coverage of.
with atheris.instrument_imports(include=["balancekit"]):
    from balancekit import Balancer
    from balancekit._engine_core import inspect_request
    from balancekit._forwarding import HOP_BY_HOP_HEADERS, upstream_request_headers
    from balancekit._routing import BadPath, normalize_path

ROUTES = Balancer(
    {
        "pools": {"api": {"backends": ["http://127.0.0.1:9"]}},
        "routes": [{"prefix": "/api/", "pool": "api"}],
    }
).routes

Head = tuple[bytes, list[tuple[bytes, bytes]], str]


class Collect:
    """Each message's head: its target, header fields and HTTP version."""

    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        if hasattr(self.parser, "set_dangerous_leniencies"):  # as the lean server
            self.parser.set_dangerous_leniencies(lenient_version=True)
        self.heads: list[Head] = []
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.in_body = False

    def on_message_begin(self) -> None:
        self.url = b""
        self.headers = []
        self.in_body = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.in_body:  # past the head these are trailer fields
            self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self.in_body = True
        self.heads.append((self.url, self.headers, self.parser.get_http_version()))


def served_version(stated: str) -> str | None:
    """The version the lean server serves a request as, or None when it
    refuses it for its version alone (RFC 9112 2.3)."""
    if stated in ("1.0", "1.1"):
        return stated
    return "1.1" if stated.startswith("1.") else None


def check(url: bytes, headers: list[tuple[bytes, bytes]], stated: str) -> None:
    try:
        parsed = httptools.parse_url(url)
    except httptools.HttpParserInvalidURLError:
        return
    try:
        raw, path = normalize_path((parsed.path or b"/").decode("latin-1"))
    except (BadPath, UnicodeDecodeError):
        return
    if not path.startswith("/"):
        assert ROUTES.match(path) is None, path  # not a path: never routed
        return
    assert "/../" not in path + "/" and "/./" not in path + "/", path
    assert "/../" not in raw + "/" and "/./" not in raw + "/", raw
    ROUTES.match(path)
    version = served_version(stated)
    if version is None:
        return
    _, problem = inspect_request(headers, version)
    if problem is None:
        names = [name for name, _ in headers]
        hosts = names.count(b"host")
        assert hosts == 1 or (hosts == 0 and version == "1.0"), headers
        assert not any(b"," in value for name, value in headers if name == b"host"), headers
        if b"transfer-encoding" in names:
            assert b"content-length" not in names, headers
            assert version != "1.0", headers
    out = upstream_request_headers(
        headers, client_ip="203.0.113.9", scheme="http", trusted=False, host=b"b:80"
    )
    names = [name for name, _ in out]
    assert names.count(b"host") == 1, out
    assert not HOP_BY_HOP_HEADERS.intersection(names), out
    assert names.count(b"x-forwarded-for") == 1, out
    assert (b"x-forwarded-for", b"203.0.113.9") in out, out


def one_input(data: bytes) -> None:
    got = Collect()
    # The heads read before an error or an upgrade are checked all the same.
    with contextlib.suppress(httptools.HttpParserUpgrade, httptools.HttpParserError):
        got.parser.feed_data(data)
    for url, headers, stated in got.heads:
        check(url, headers, stated)


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
