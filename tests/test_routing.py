from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from balancekit import Balancer
from balancekit._classify import Refuse, Routed
from balancekit._routing import BadPath, Route, RouteTable, normalize_path, remove_dot_segments


def table(*prefixes: str) -> RouteTable:
    return RouteTable(Route(p, f"pool{p}") for p in prefixes)


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        pytest.param("/api", "/api/", id="bare-prefix"),
        pytest.param("/api/", "/api/", id="prefix-slash"),
        pytest.param("/api/x", "/api/", id="below"),
        pytest.param("/apix", "/", id="not-a-segment"),
        pytest.param("/api/v2/users", "/api/v2", id="longest-wins"),
        pytest.param("/api/v2", "/api/v2", id="exact-longer"),
        pytest.param("/api/v22", "/api/", id="longer-not-a-segment"),
        pytest.param("/", "/", id="root"),
        pytest.param("/other", "/", id="root-catches-all"),
    ],
)
def test_segment_aware_longest_prefix(path: str, expected: str) -> None:
    route = table("/", "/api/", "/api/v2").match(path)
    assert route is not None
    assert route.pool == f"pool{expected}"


def test_prefix_with_or_without_slash_is_the_same_route() -> None:
    for prefix in ("/api", "/api/"):
        routes = table(prefix)
        assert routes.match("/api") is not None
        assert routes.match("/api/x") is not None
        assert routes.match("/apix") is None
        assert routes.match("/") is None


def test_no_routes_match_nothing() -> None:
    assert RouteTable().match("/x") is None


@pytest.mark.parametrize(
    ("path", "upstream"),
    [
        pytest.param("/api/users", "/users", id="strip"),
        pytest.param("/api", "/", id="bare"),
        pytest.param("/api/", "/", id="slash"),
        pytest.param("/api/a/b/", "/a/b/", id="trailing"),
    ],
)
def test_strip_prefix(path: str, upstream: str) -> None:
    assert Route("/api", "api", strip_prefix=True).upstream_path(path) == upstream
    assert Route("/api", "api").upstream_path(path) == path


@pytest.mark.parametrize(
    ("raw", "stripped", "rewritten"),
    [
        pytest.param("/%61pi/users", "/users", "/v2/users", id="encoded-prefix"),
        pytest.param("/a%70i/v1/%75sers", "/v1/%75sers", "/v2/v1/%75sers", id="encoded-rest-kept"),
        pytest.param("/%61pi", "/", "/v2", id="bare"),
        pytest.param("/api/%2Fx", "/%2Fx", "/v2/%2Fx", id="encoded-slash-after"),
    ],
)
def test_the_prefix_is_cut_from_the_raw_path_by_segments(
    raw: str, stripped: str, rewritten: str
) -> None:
    # The route matched the decoded path; the raw one keeps its encoding,
    # so its prefix is not as long as the decoded one.
    assert Route("/api", "api", strip_prefix=True).upstream_path(raw) == stripped
    assert Route("/api", "api", rewrite="/v2").upstream_path(raw) == rewritten


def test_an_encoded_slash_inside_a_replaced_prefix_is_refused() -> None:
    balancer = Balancer(
        {
            "pools": {"api": {"backends": ["http://127.0.0.1:9001"]}},
            "routes": [
                {"prefix": "/a/b/", "pool": "api", "strip_prefix": True},
                {"prefix": "/c/d/", "pool": "api"},
            ],
        }
    )
    host = [(b"host", b"t")]
    verdict = balancer.classify("GET", "/a%2Fb/x", host)
    assert isinstance(verdict, Refuse) and verdict.status == 400
    kept = balancer.classify("GET", "/c%2Fd/x", host)  # nothing to cut: sent as it came
    assert isinstance(kept, Routed) and kept.target == "/c%2Fd/x"


@pytest.mark.parametrize(
    ("path", "resolved"),
    [
        pytest.param("/a/b/../c", "/a/c", id="parent"),
        pytest.param("/a/./b", "/a/b", id="dot"),
        pytest.param("/a/b/..", "/a/", id="trailing-parent"),
        pytest.param("/a/.", "/a/", id="trailing-dot"),
        pytest.param("/a/b/c.txt", "/a/b/c.txt", id="dots-in-names"),
        pytest.param("/a/..b/c", "/a/..b/c", id="not-a-dot-segment"),
    ],
)
def test_dot_segments(path: str, resolved: str) -> None:
    assert remove_dot_segments(path) == resolved


@pytest.mark.parametrize(
    "path",
    [
        pytest.param("/..", id="root-parent"),
        pytest.param("/a/../../etc/passwd", id="climb"),
        pytest.param("/api/%2e%2e/%2E%2E/x", id="encoded-dots"),
        pytest.param("/api/..%2f..%2fetc", id="encoded-slash"),
    ],
)
def test_climbing_above_the_root_is_refused(path: str) -> None:
    with pytest.raises(BadPath):
        normalize_path(path)


def test_normalize_keeps_percent_encoding_for_upstream() -> None:
    assert normalize_path("/api/a%20b/../c%3F") == ("/api/c%3F", "/api/c?")


segment = st.sampled_from(["a", "b", ".", "..", "", "c.d", "%2e", "x%20y"])


def rfc3986_remove_dot_segments(path: str) -> str:
    """RFC 3986 section 5.2.4 written out as its input-buffer loop: the oracle."""
    inp, out = path, ""
    while inp:
        if inp.startswith("../"):
            inp = inp[3:]
        elif inp.startswith(("./", "/./")):
            inp = inp[2:]
        elif inp == "/.":
            inp = "/"
        elif inp == "/.." or inp.startswith("/../"):
            inp = "/" + inp[4:]
            out = out[: out.rfind("/")] if "/" in out else ""
        elif inp in (".", ".."):
            inp = ""
        else:
            cut = inp.find("/", 1)
            segment, inp = (inp, "") if cut < 0 else (inp[:cut], inp[cut:])
            out += segment
    return out


@given(st.lists(segment, max_size=8))
def test_resolution_agrees_with_the_rfc(segments: list[str]) -> None:
    path = "/" + "/".join(segments)
    try:
        raw, _ = normalize_path(path)
    except BadPath:
        return
    assert raw.startswith("/")
    assert "/../" not in raw + "/" and "/./" not in raw + "/"
    if "%" not in path:
        assert raw == rfc3986_remove_dot_segments(path)


@given(st.lists(st.sampled_from(["api", "v2", "apix", "x", ""]), min_size=1, max_size=5))
def test_match_agrees_with_a_linear_scan(segments: list[str]) -> None:
    prefixes = ["/api", "/api/v2", "/x"]
    path = "/" + "/".join(segments)
    candidates = [p for p in prefixes if path == p or path.startswith(p + "/")]
    expected = max(candidates, key=len) if candidates else None
    route = RouteTable(Route(p, p) for p in prefixes).match(path)
    assert (route.pool if route else None) == expected


def test_a_target_that_is_not_a_path_is_never_routed() -> None:
    # Found by fuzz/fuzz_request.py: "x/./api/y" once resolved to "/api/y".
    routes = RouteTable([Route("/", "p")])
    for target in ("*", "x/./api/y", "*a/ix&", "a/../b"):
        raw, path = normalize_path(target)
        assert (raw, path) == (target, target)
        assert routes.match(path) is None
