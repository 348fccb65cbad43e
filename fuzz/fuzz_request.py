"""Fuzz the request path: bytes from a hostile client, through the parser
the lean server uses and every function that turns a request into the one
sent upstream.

    python fuzz/fuzz_request.py -max_total_time=60

Invariants, whatever the bytes: the parser either refuses the request or
yields one; a path either normalises (to one that holds no dot segment,
or, when it does not start with "/", to one no route matches) or is
refused with BadPath/UnicodeDecodeError; framing checks never raise; the
upstream headers hold exactly one Host, no hop-by-hop field, and no
X-Forwarded-* from an untrusted client but ours.
"""

from __future__ import annotations

import sys

import atheris
import httptools

with atheris.instrument_imports():
    from balancekit import Balancer
    from balancekit._exchange import inspect_request
    from balancekit._forwarding import HOP_BY_HOP_HEADERS, upstream_request_headers
    from balancekit._routing import BadPath, normalize_path

ROUTES = Balancer(
    {
        "pools": {"api": {"backends": ["http://127.0.0.1:9"]}},
        "routes": [{"prefix": "/api/", "pool": "api"}],
    }
).routes


class Collect:
    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.complete = False
        self.version = "1.1"
        self.parser = httptools.HttpRequestParser(self)

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self.complete = True
        self.version = self.parser.get_http_version()


def one_input(data: bytes) -> None:
    got = Collect()
    try:
        got.parser.feed_data(data)
    except httptools.HttpParserUpgrade:
        pass
    except httptools.HttpParserError:
        return
    if not got.complete:
        return
    try:
        url = httptools.parse_url(got.url)
    except httptools.HttpParserInvalidURLError:
        return
    try:
        raw, path = normalize_path((url.path or b"/").decode("latin-1"))
    except (BadPath, UnicodeDecodeError):
        return
    if not path.startswith("/"):
        assert ROUTES.match(path) is None, path  # not a path: never routed
        return
    assert "/../" not in path + "/" and "/./" not in path + "/", path
    assert "/../" not in raw + "/" and "/./" not in raw + "/", raw
    ROUTES.match(path)
    _, problem = inspect_request(got.headers, got.version)
    if problem is None:  # what is forwarded names one host at most
        assert [name for name, _ in got.headers].count(b"host") <= 1, got.headers
    out = upstream_request_headers(
        got.headers, client_ip="203.0.113.9", scheme="http", trusted=False, host=b"b:80"
    )
    names = [name for name, _ in out]
    assert names.count(b"host") == 1, out
    assert not HOP_BY_HOP_HEADERS.intersection(names), out
    assert names.count(b"x-forwarded-for") == 1, out
    assert (b"x-forwarded-for", b"203.0.113.9") in out, out


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
