from __future__ import annotations

from hypothesis import given, strategies as st

from balancekit._config import load_config
from balancekit._forwarding import (
    HOP_BY_HOP_HEADERS,
    TrustedProxies,
    downstream_response_headers,
    upstream_request_headers,
)


def up(headers, *, trusted=False, host=b"", client_ip="203.0.113.9", scheme="https"):
    return upstream_request_headers(
        headers, client_ip=client_ip, scheme=scheme, trusted=trusted, host=host
    )


def names(headers) -> list[bytes]:
    return [k for k, _ in headers]


def test_hop_by_hop_and_connection_named_headers_are_removed() -> None:
    headers = [
        (b"host", b"example.com"),
        (b"connection", b"keep-alive, X-Secret"),
        (b"keep-alive", b"timeout=5"),
        (b"x-secret", b"1"),
        (b"te", b"trailers"),
        (b"upgrade", b"h2c"),
        (b"proxy-authorization", b"Basic x"),
        (b"accept", b"*/*"),
    ]
    out = up(headers)
    assert set(names(out)) == {
        b"host",
        b"accept",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
    }


def test_forwarded_headers_from_an_untrusted_client_are_replaced() -> None:
    headers = [
        (b"host", b"example.com:8443"),
        (b"x-forwarded-for", b"1.2.3.4"),
        (b"x-forwarded-proto", b"gopher"),
        (b"x-forwarded-host", b"evil"),
    ]
    out = dict(up(headers))
    assert out[b"x-forwarded-for"] == b"203.0.113.9"
    assert out[b"x-forwarded-proto"] == b"https"
    assert out[b"x-forwarded-host"] == b"example.com:8443"


def test_forwarded_headers_from_a_trusted_proxy_are_kept_and_appended() -> None:
    headers = [
        (b"host", b"inner"),
        (b"x-forwarded-for", b"1.2.3.4"),
        (b"x-forwarded-for", b"5.6.7.8"),
        (b"x-forwarded-proto", b"https"),
        (b"x-forwarded-host", b"outer.example"),
    ]
    out = up(headers, trusted=True, scheme="http")
    assert out.count((b"x-forwarded-for", b"1.2.3.4, 5.6.7.8, 203.0.113.9")) == 1
    assert (b"x-forwarded-proto", b"https") in out
    assert (b"x-forwarded-host", b"outer.example") in out
    assert len([n for n in names(out) if n.startswith(b"x-forwarded")]) == 3


def test_host_placeholder_first_or_client_host_kept() -> None:
    headers = [(b"accept", b"*/*"), (b"host", b"client.example")]
    assert up(headers)[0] == (b"host", b"")  # replaced per backend by the engine
    preserved = up(headers, host=None)
    assert (b"host", b"client.example") in preserved
    assert names(preserved).count(b"host") == 1


def test_response_hop_by_hop_removed_and_set_cookie_kept_apart() -> None:
    headers = [
        (b"Set-Cookie", b"a=1"),
        (b"Connection", b"close, X-Internal"),
        (b"X-Internal", b"1"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Set-Cookie", b"b=2"),
        (b"Content-Type", b"text/plain"),
        (b"Server", b"upstream"),
    ]
    out = downstream_response_headers(headers)
    assert out == [
        (b"set-cookie", b"a=1"),
        (b"set-cookie", b"b=2"),
        (b"content-type", b"text/plain"),
    ]


def test_trusted_proxies() -> None:
    trusted = TrustedProxies(
        load_config({"trusted_proxies": ["10.0.0.0/8", "::1/128"]}).trusted_proxies
    )
    assert "10.1.2.3" in trusted
    assert "::1" in trusted
    assert "11.0.0.1" not in trusted
    assert "not-an-ip" not in trusted
    assert "10.1.2.3" not in TrustedProxies(())


token = st.sampled_from(
    [
        b"host",
        b"accept",
        b"connection",
        b"x-forwarded-for",
        b"te",
        b"upgrade",
        b"x-a",
        b"keep-alive",
    ]
)
value = st.binary(min_size=0, max_size=12).filter(lambda v: b"\r" not in v and b"\n" not in v)


@given(st.lists(st.tuples(token, value), max_size=12), st.booleans())
def test_no_hop_by_hop_header_ever_goes_upstream(headers, trusted) -> None:
    out = up(headers, trusted=trusted)
    named: set[bytes] = set()
    for k, v in headers:
        if k == b"connection":
            named.update(t.strip().lower() for t in v.split(b","))
    for name in names(out):
        assert name not in HOP_BY_HOP_HEADERS
        assert name not in named or name in (
            b"host",
            b"x-forwarded-for",
            b"x-forwarded-proto",
            b"x-forwarded-host",
        )
    assert names(out).count(b"x-forwarded-for") == 1
    assert names(out).count(b"host") == 1


@given(st.lists(st.tuples(token, value), max_size=12))
def test_response_headers_keep_order_of_what_remains(headers) -> None:
    drop = set(HOP_BY_HOP_HEADERS) | {b"date", b"server"}
    for k, v in headers:
        if k == b"connection":
            drop.update(t.strip().lower() for t in v.split(b","))
    assert downstream_response_headers(headers) == [(k, v) for k, v in headers if k not in drop]
