"""Header rewriting in both directions: hop-by-hop removal and X-Forwarded-*.

RFC 9110 section 7.6.1: hop-by-hop headers, and every header a Connection
header names, apply to one connection and are never forwarded.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from random import getrandbits

from ._config import IPNetwork
from ._types import RawHeaders

HOP_BY_HOP_HEADERS = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
_FORWARDED = (b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host")


#: Connection header values that name nothing beyond the hop-by-hop set.
_PLAIN_CONNECTION = frozenset({b"keep-alive", b"close"})


def _connection_tokens(headers: RawHeaders) -> frozenset[bytes]:
    tokens: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            lowered = value.lower()
            if lowered not in _PLAIN_CONNECTION:  # the common case, skipped
                tokens.update(t.strip() for t in lowered.split(b","))
    return frozenset(tokens)


class TrustedProxies:
    """``address in trusted``: whether an address is in ``trusted_proxies``.

    Answers are cached per address (up to a bound), so a busy client costs
    one dict probe per request instead of a CIDR scan.
    """

    def __init__(self, networks: Sequence[IPNetwork]) -> None:
        self.networks = tuple(networks)
        self._cache: dict[str, bool] = {}

    def __contains__(self, address: object) -> bool:
        if not self.networks or not isinstance(address, str):
            return False
        hit = self._cache.get(address)
        if hit is None:
            hit = self._lookup(address)
            if len(self._cache) < 4096:
                self._cache[address] = hit
        return hit

    def _lookup(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in net for net in self.networks)


def upstream_request_headers(
    headers: RawHeaders,
    *,
    client_ip: str,
    scheme: str,
    trusted: bool,
    host: bytes | None,
    request_id: bytes = b"",
    drop: frozenset[bytes] = HOP_BY_HOP_HEADERS,
) -> RawHeaders:
    """The headers to send upstream.

    ``host`` is the Host to send (the backend's), or None to keep the
    client's (``preserve_host``). X-Forwarded-For/Proto/Host are set from
    this hop; when the client is a trusted proxy its own values are kept and
    For is appended to. ``request_id`` names the request id header (lower
    case; empty for none): the client's value goes on when it is 1-200
    visible ASCII characters, else a new UUID4 does, and either way the
    id is the last pair of the list. ``drop``: the hop-by-hop names, to which the
    options of a Connection header are added (then the headers are walked
    again: a Connection header that names more than keep-alive or close is
    rare, and one walk is every other request's cost).
    """
    out: RawHeaders = []
    client_host = b""
    seen_for: list[bytes] = []
    seen_proto = seen_host = connection = False
    client_id: bytes | None = None
    for name, value in headers:
        lname = name.lower()
        if lname in drop:
            if lname == b"connection":
                connection = True
            continue
        if lname == request_id:  # never b"": a header name is not empty
            if client_id is None:
                client_id = value
            continue
        if lname == b"host":
            client_host = value
            if host is not None:
                continue
        elif lname in _FORWARDED:
            if not trusted:
                continue
            if lname == b"x-forwarded-for":
                seen_for.append(value)
                continue
            if lname == b"x-forwarded-proto":
                seen_proto = True
            else:
                seen_host = True
        out.append((lname, value))
    if connection and drop is HOP_BY_HOP_HEADERS:
        extra = _connection_tokens(headers)
        if extra:
            return upstream_request_headers(
                headers,
                client_ip=client_ip,
                scheme=scheme,
                trusted=trusted,
                host=host,
                request_id=request_id,
                drop=drop | extra,
            )
    if host is not None:
        out.insert(0, (b"host", host))
    ip = client_ip.encode("latin-1")
    out.append((b"x-forwarded-for", b", ".join([*seen_for, ip]) if seen_for else ip))
    if not seen_proto:
        out.append((b"x-forwarded-proto", scheme.encode("latin-1")))
    if not seen_host and client_host:
        out.append((b"x-forwarded-host", client_host))
    if request_id:
        if client_id is None or not _VALID_ID(client_id):
            client_id = new_request_id()
        out.append((request_id, client_id))
    return out


def new_request_id() -> bytes:
    """A random UUID (version 4, RFC 9562), formatted as ``uuid.uuid4()``
    would give it, in a quarter of its time.

    The bits come from :mod:`random`, not the system's CSPRNG: an id must
    be unique, not secret (a client may send any id it likes), and the
    module reseeds itself in a forked worker, so workers never share ids.
    """
    h = b"%032x" % (getrandbits(128) & _UUID4_CLEAR | _UUID4_SET)
    return b"%s-%s-%s-%s-%s" % (h[:8], h[8:12], h[12:16], h[16:20], h[20:])


#: The version (4) and variant bits of a random UUID, as ``uuid.UUID`` sets them.
_UUID4_CLEAR = ~(0xF000 << 64) & ~(0xC000 << 48)
_UUID4_SET = (0x4000 << 64) | (0x8000 << 48)


#: A request id passed on as the client sent it: 1-200 visible ASCII
#: characters (no space, no control character, so nothing to split a log
#: line or a header on).
_VALID_ID = re.compile(rb"[\x21-\x7e]{1,200}").fullmatch


#: Headers the serving ASGI server writes itself; the upstream's copies are
#: dropped so a client never gets two (NGINX hides them by default too).
SERVER_OWNED_HEADERS = frozenset({b"date", b"server"})
_RESPONSE_DROP = HOP_BY_HOP_HEADERS | SERVER_OWNED_HEADERS


def downstream_response_headers(
    headers: Sequence[tuple[bytes, bytes]], request_id: tuple[bytes, bytes] | None = None
) -> RawHeaders:
    """The upstream response's headers without hop-by-hop ones; repeats kept.

    ``request_id`` (name, value) goes back to the client in place of any
    the upstream sent under that name.
    """
    out: RawHeaders = []
    named: frozenset[bytes] = frozenset()
    chunked = False
    for name, value in headers:
        lname = name.lower()
        if lname == b"connection":
            named = named | _connection_tokens([(lname, value)])
        elif lname == b"transfer-encoding":
            chunked = True
        elif lname not in _RESPONSE_DROP and (request_id is None or lname != request_id[0]):
            out.append((lname, value))
    if chunked:
        # RFC 9112 section 6.3: Transfer-Encoding overrides Content-Length,
        # and the body was read that way; its length must not be passed on.
        named = named | {b"content-length"}
    if named:  # rare: headers named in Connection go too, wherever they stood
        out = [(name, value) for name, value in out if name not in named]
    if request_id is not None:
        out.append(request_id)
    return out
