"""A pool's ``tls`` table: CAs, client certificates, SNI and verify = false,
over every transport and in HTTP health checks, against real TLS upstreams
(uvicorn with certificates made by trustme)."""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme
from cryptography.hazmat.primitives import serialization
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from balancekit import Balancer, ConfigError
from balancekit.asgi import BalanceMiddleware
from balancekit.health.http import HTTPHealthCheck
from tests.conftest import ServerThread
from tests.helpers import app_fallback, balanced
from tests.upstreams import make_echo_app

#: The four transports: aiohttp, httpx and httptools under the ASGI
#: middleware, urllib3 ("wsgi") and httpx's sync client under the WSGI one.
TLS_ENGINES = ["aiohttp", "httpx", "httptools", "wsgi", "wsgi-httpx"]


@pytest.fixture(params=TLS_ENGINES)
def engine(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@dataclass
class PKI:
    """A CA the pools trust, one they do not, and files made from them."""

    dir: Path
    ca: Path  # the trusted CA, PEM
    server: tuple[Path, Path]  # for 127.0.0.1, by the trusted CA
    named: tuple[Path, Path]  # for api.internal only, by the trusted CA
    stranger: tuple[Path, Path]  # for 127.0.0.1, by a CA nobody trusts
    stranger_ca: Path
    client: tuple[Path, Path]  # a client certificate, by the trusted CA
    other_key: Path  # a key that matches no certificate here


def _write(cert: trustme.LeafCert, where: Path, name: str) -> tuple[Path, Path]:
    chain, key = where / f"{name}.pem", where / f"{name}.key"
    chain.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    key.write_bytes(cert.private_key_pem.bytes())
    return chain, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    where = tmp_path_factory.mktemp("pki")
    ca, stranger_ca = trustme.CA(), trustme.CA()
    ca.cert_pem.write_to_path(where / "ca.pem")
    stranger_ca.cert_pem.write_to_path(where / "stranger-ca.pem")
    other = ca.issue_cert("other.internal")
    other.private_key_pem.write_to_path(where / "other.key")
    return PKI(
        dir=where,
        ca=where / "ca.pem",
        server=_write(ca.issue_cert("127.0.0.1"), where, "server"),
        named=_write(ca.issue_cert("api.internal"), where, "named"),
        stranger=_write(stranger_ca.issue_cert("127.0.0.1"), where, "stranger"),
        stranger_ca=where / "stranger-ca.pem",
        client=_write(ca.issue_cert("client@balancekit.test"), where, "client"),
        other_key=where / "other.key",
    )


class TLSUpstream:
    """An echo upstream on https://127.0.0.1 (uvicorn, in a thread), with
    the SNI names its clients sent."""

    def __init__(self, server: ServerThread) -> None:
        self.server = server
        self.app = server.app
        self.url = f"https://127.0.0.1:{server.port}"
        self.sni: list[str | None] = []
        context = server.server.config.ssl  # made by uvicorn as it started
        assert context is not None
        context.sni_callback = lambda sock, name, ctx: self.sni.append(name)


@pytest.fixture
def tls_upstream(serve) -> Callable[..., TLSUpstream]:
    """Start TLS upstreams (``client_ca``: one that requires a client
    certificate). Through ``serve``, so that they stop after the balancers
    started later: a TLS server waits for its clients' goodbyes."""

    def start(cert: tuple[Path, Path], client_ca: Path | None = None) -> TLSUpstream:
        options: dict[str, Any] = {"ssl_certfile": str(cert[0]), "ssl_keyfile": str(cert[1])}
        if client_ca is not None:
            options |= {"ssl_ca_certs": str(client_ca), "ssl_cert_reqs": ssl.CERT_REQUIRED}
        return TLSUpstream(serve(make_echo_app("tls"), **options))

    return start


def get(url: str) -> httpx.Response:
    return httpx.get(url, timeout=10)


# --- requests over every transport ---------------------------------------------


def test_https_backend_verified_against_the_pools_ca(serve, tls_upstream, pki, engine) -> None:
    upstream = tls_upstream(pki.server)
    trusted, _ = balanced(serve, [upstream.url], engine=engine, pool={"tls": {"ca": str(pki.ca)}})
    response = get(f"{trusted.url}/api/users")
    assert response.status_code == 200, response.text
    assert response.json()["path"] == "/api/users"
    # Without the table, the system's CAs: trustme's CA is not among them.
    untrusted, _ = balanced(serve, [upstream.url], engine=engine)
    assert get(f"{untrusted.url}/api/users").status_code == 502


def test_client_certificate_for_a_backend_that_requires_one(
    serve, tls_upstream, pki, engine
) -> None:
    upstream = tls_upstream(pki.server, client_ca=pki.ca)
    ca_only = {"ca": str(pki.ca)}
    refused, _ = balanced(serve, [upstream.url], engine=engine, pool={"tls": ca_only})
    assert get(f"{refused.url}/api/x").status_code == 502
    mtls = {**ca_only, "cert": str(pki.client[0]), "key": str(pki.client[1])}
    server, _ = balanced(serve, [upstream.url], engine=engine, pool={"tls": mtls})
    with httpx.Client(timeout=10) as client:
        for _ in range(3):
            assert client.get(f"{server.url}/api/x").status_code == 200


def test_server_name_is_sent_and_verified(serve, tls_upstream, pki, engine) -> None:
    upstream = tls_upstream(pki.named)  # names api.internal only, served on 127.0.0.1
    named = {"ca": str(pki.ca), "server_name": "api.internal"}
    server, _ = balanced(serve, [upstream.url], engine=engine, pool={"tls": named})
    response = get(f"{server.url}/api/x")
    assert response.status_code == 200, response.text
    assert upstream.sni == ["api.internal"]
    # The Host header is still the backend's own address.
    assert dict(response.json()["headers"])["host"] == f"127.0.0.1:{upstream.server.port}"
    without, _ = balanced(serve, [upstream.url], engine=engine, pool={"tls": {"ca": str(pki.ca)}})
    assert get(f"{without.url}/api/x").status_code == 502  # 127.0.0.1 is not api.internal


def test_verify_false_reaches_an_untrusted_backend_and_warns_once(
    serve, tls_upstream, pki, engine, caplog
) -> None:
    upstream = tls_upstream(pki.stranger)
    with caplog.at_level(logging.WARNING, logger="balancekit"):
        server, _ = balanced(serve, [upstream.url], engine=engine, pool={"tls": {"verify": False}})
        with httpx.Client(timeout=10) as client:
            for _ in range(3):
                # urllib3's InsecureRequestWarning would be an error here (and a 502)
                assert client.get(f"{server.url}/api/x").status_code == 200
    warnings = [r for r in caplog.records if "tls.verify = false" in r.getMessage()]
    assert len(warnings) == 1
    assert warnings[0].name == "balancekit" and warnings[0].levelno == logging.WARNING
    assert "pool api" in warnings[0].getMessage()


class Handshakes:
    """Counts the TLS handshakes made with one SSLContext object."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.count = 0
        for method in ("wrap_bio", "wrap_socket"):
            original = getattr(context, method)
            setattr(context, method, self._counting(original))

    def _counting(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            self.count += 1
            return original(*args, **kwargs)

        return wrapped


def test_every_transport_uses_the_pools_context_and_keeps_its_connection(
    serve, tls_upstream, pki, engine
) -> None:
    upstream = tls_upstream(pki.server)
    server, balancer = balanced(
        serve, [upstream.url], engine=engine, pool={"tls": {"ca": str(pki.ca)}}
    )
    handshakes = Handshakes(_context(balancer, "api"))
    with httpx.Client(timeout=10) as client:
        for _ in range(5):
            assert client.get(f"{server.url}/api/x").status_code == 200
    assert handshakes.count == 1  # one connection with the pool's context, kept alive


def test_pools_with_different_tls_to_one_backend_never_share_a_connection(
    serve, tls_upstream, pki, engine
) -> None:
    upstream = tls_upstream(pki.server)
    mtls = {"ca": str(pki.ca), "cert": str(pki.client[0]), "key": str(pki.client[1])}
    config = {
        "pools": {
            "plain": {"backends": [upstream.url], "tls": {"ca": str(pki.ca)}},
            "mtls": {"backends": [upstream.url], "tls": mtls},
        },
        "routes": [{"prefix": "/a/", "pool": "plain"}, {"prefix": "/b/", "pool": "mtls"}],
    }
    server, balancer = _serve_config(serve, config, engine)
    spies = {name: Handshakes(_context(balancer, name)) for name in ("plain", "mtls")}
    with httpx.Client(timeout=10) as client:
        for _ in range(2):
            assert client.get(f"{server.url}/a/x").status_code == 200
            assert client.get(f"{server.url}/b/x").status_code == 200
    assert (spies["plain"].count, spies["mtls"].count) == (1, 1)


def _context(balancer: Balancer, pool: str) -> ssl.SSLContext:
    tls = balancer.pools[pool].tls
    assert tls is not None
    return tls.context


def _serve_config(serve, config: dict[str, Any], engine: str) -> tuple[Any, Balancer]:
    from balancekit.wsgi import BalanceMiddleware as WSGIBalanceMiddleware
    from tests.helpers import wsgi_fallback

    transport = {"wsgi": "aiohttp", "wsgi-httpx": "httpx"}.get(engine, engine)
    balancer = Balancer({**config, "transport": transport})
    if engine.startswith("wsgi"):
        return serve(WSGIBalanceMiddleware(wsgi_fallback, balancer=balancer), wsgi=True), balancer
    return serve(BalanceMiddleware(app_fallback, balancer=balancer)), balancer


def test_websocket_to_a_wss_backend_uses_the_pools_tls(serve, tls_upstream, pki) -> None:
    upstream = tls_upstream(pki.named)
    named = {"ca": str(pki.ca), "server_name": "api.internal"}
    server, balancer = balanced(serve, [upstream.url], pool={"tls": named})

    async def talk() -> tuple[Any, int | None]:
        async with connect(server.url.replace("http://", "ws://") + "/api/ws") as ws:
            await ws.send("hello")
            echoed = await ws.recv()
            # The upstream closes (4001): a close the client starts is still
            # being finished upstream when the servers stop, which uvicorn
            # cannot shut down cleanly.
            await ws.send("bye")
            with pytest.raises(ConnectionClosed) as info:
                await ws.recv()
            return echoed, info.value.rcvd.code if info.value.rcvd else None

    assert asyncio.run(talk()) == ("echo:hello", 4001)
    assert upstream.sni == ["api.internal"]
    # The proxy finishes its side after the client, as tests/test_websocket.py waits.
    _wait_for(lambda: balancer.pools["api"].active_requests == 0)


# --- health checks ---------------------------------------------------------------


def _wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


@pytest.mark.parametrize(
    ("ca", "healthy"),
    [pytest.param("ca", True, id="right-ca"), pytest.param("stranger_ca", False, id="wrong-ca")],
)
def test_http_health_check_goes_over_the_pools_tls(serve, tls_upstream, pki, ca, healthy) -> None:
    upstream = tls_upstream(pki.server, client_ca=pki.ca)  # the probe needs the client cert too
    tls = {"ca": str(getattr(pki, ca)), "cert": str(pki.client[0]), "key": str(pki.client[1])}
    check = {"type": "http", "path": "/healthz", "interval": 0.05, "timeout": 1.0, "fall": 2}
    balancer = Balancer(
        {
            "pools": {"api": {"backends": [upstream.url], "tls": tls, "health_check": check}},
            "routes": [{"prefix": "/api/", "pool": "api"}],
        }
    )
    serve(BalanceMiddleware(app_fallback, balancer=balancer))  # its lifespan starts the checks
    backend = balancer.pools["api"].backends[0]
    _wait_for(lambda: backend.last_check_ok is not None)
    if healthy:
        _wait_for(lambda: len(upstream.app.seen) >= 3)
        assert backend.last_check_ok is True
        assert backend.state.value == "healthy"
    else:
        _wait_for(lambda: backend.state.value == "unhealthy")
        assert backend.last_check_ok is False
        assert upstream.app.seen == []  # no probe got through the handshake

    async def probe() -> bool:
        http_check = HTTPHealthCheck(path="/healthz")
        try:
            return await http_check.check(backend)
        finally:
            await http_check.aclose()

    assert asyncio.run(probe()) is healthy


# --- built once --------------------------------------------------------------------


def _config(pki: PKI, url: str, **pool: Any) -> dict[str, Any]:
    tls = {"ca": str(pki.ca), **pool.pop("tls", {})}
    return {
        "pools": {"api": {"backends": [url], "tls": tls, **pool}},
        "routes": [{"prefix": "/api/", "pool": "api"}],
    }


def test_the_context_is_built_once_and_again_only_when_tls_changes(
    serve, tls_upstream, pki, monkeypatch, tmp_path
) -> None:
    import balancekit._upstream_tls as upstream_tls_module

    built: list[ssl.SSLContext] = []
    make = upstream_tls_module._context

    def counting(*args: Any) -> ssl.SSLContext:
        built.append(make(*args))
        return built[-1]

    monkeypatch.setattr(upstream_tls_module, "_context", counting)
    upstream = tls_upstream(pki.server)
    ca = tmp_path / "ca.pem"
    ca.write_bytes(pki.ca.read_bytes())
    config = _config(pki, upstream.url, tls={"ca": str(ca)})
    balancer = Balancer(config)
    server = serve(BalanceMiddleware(app_fallback, balancer=balancer))
    pool = balancer.pools["api"]
    first = pool.tls
    assert first is not None and len(built) == 1
    assert pool.backends[0].tls is first  # the backends carry the pool's

    with httpx.Client(timeout=10) as client:
        for _ in range(3):
            assert client.get(f"{server.url}/api/x").status_code == 200
    assert len(built) == 1  # never per request

    balancer.reload(config)  # nothing changed: the pool and its context stay
    assert balancer.pools["api"] is pool and pool.tls is first
    other = {**config["pools"]["api"], "max_connections": 10}
    balancer.reload({**config, "pools": {"api": other}})  # the pool is rebuilt, its TLS is not
    assert balancer.pools["api"] is not pool and balancer.pools["api"].tls is first
    assert len(built) == 1

    named = {**other, "tls": {"ca": str(ca), "server_name": "127.0.0.1"}}
    balancer.reload({**config, "pools": {"api": named}})  # the table changed
    assert len(built) == 2 and balancer.pools["api"].tls is not first
    changed = balancer.pools["api"].tls

    # The CA file rotated, the table did not: a reload picks the file up.
    ca.write_bytes(pki.ca.read_bytes() + b"\n")
    os.utime(ca, ns=(time.time_ns(), time.time_ns() + 1_000_000_000))
    kept = balancer.pools["api"]
    balancer.reload({**config, "pools": {"api": named}})
    assert balancer.pools["api"] is kept  # live state kept
    assert len(built) == 3 and kept.tls is not changed
    assert kept.backends[0].tls is kept.tls
    with httpx.Client(timeout=10) as client:
        assert client.get(f"{server.url}/api/x").status_code == 200


def test_backends_carry_the_pools_tls_only_when_https(pki) -> None:
    balancer = Balancer(
        {
            "pools": {
                "api": {
                    "backends": ["https://127.0.0.1:9443", "http://127.0.0.1:9080"],
                    "tls": {"ca": str(pki.ca)},
                },
                "plain": {"backends": ["https://127.0.0.1:9443"]},
            }
        }
    )
    pool = balancer.pools["api"]
    https, http = pool.backends
    assert https.tls is pool.tls and http.tls is None
    assert pool.add_backend("https://127.0.0.1:9444").tls is pool.tls  # joins at run time
    assert balancer.pools["plain"].backends[0].tls is None  # system defaults
    tls = pool.tls
    assert tls is not None and tls.server_name is None and tls.verify
    assert tls.context.verify_mode is ssl.CERT_REQUIRED and tls.context.check_hostname
    assert len(tls.context.get_ca_certs()) == 1  # the pool's CA replaces the system's


def test_verify_false_warns_once_per_pool_and_again_only_for_a_new_context(caplog) -> None:
    def pools(off: dict[str, Any]) -> dict[str, Any]:
        https = ["https://127.0.0.1:9443"]
        return {
            "pools": {
                "a": {"backends": https, "tls": off},
                "b": {"backends": https, "tls": off},
                "c": {"backends": https},
            }
        }

    def warned() -> list[str]:
        return [
            r.getMessage()[:6] for r in caplog.records if "tls.verify = false" in r.getMessage()
        ]

    with caplog.at_level(logging.WARNING, logger="balancekit"):
        balancer = Balancer(pools({"verify": False}))
        assert warned() == ["pool a", "pool b"]
        balancer.reload(pools({"verify": False}))  # the same contexts: nothing new to say
        assert len(warned()) == 2
        balancer.reload(pools({"verify": False, "server_name": "api.internal"}))
        assert warned()[2:] == ["pool a", "pool b"]


# --- paths -------------------------------------------------------------------------


def test_relative_files_are_beside_the_toml_file(pki, tmp_path, monkeypatch) -> None:
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "certs").mkdir()
    files = {"ca.pem": pki.ca, "client.pem": pki.client[0], "client.key": pki.client[1]}
    for name, source in files.items():
        (conf / "certs" / name).write_bytes(source.read_bytes())
    (conf / "balancekit.toml").write_text(
        """
[pools.api]
backends = ["https://127.0.0.1:9443"]
tls = { ca = "certs/ca.pem", cert = "certs/client.pem", key = "certs/client.key" }
"""
    )
    monkeypatch.chdir(tmp_path)  # not the file's directory
    balancer = Balancer(conf / "balancekit.toml")
    tls = balancer.config.pools["api"].tls
    assert tls is not None and tls.ca == str(conf / "certs" / "ca.pem")
    assert balancer.pools["api"].tls is not None
    # A dict's are relative to the working directory.
    monkeypatch.chdir(conf)
    table = {"ca": "certs/ca.pem"}
    assert Balancer({"pools": {"api": {"backends": [], "tls": table}}}).pools["api"].tls


# --- bad input -----------------------------------------------------------------------


def _encrypted_key(pki: PKI) -> Path:
    key = serialization.load_pem_private_key(pki.client[1].read_bytes(), None)
    path = pki.dir / "encrypted.key"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    return path


def _not_pem(pki: PKI) -> Path:
    path = pki.dir / "not.pem"
    path.write_text("this is not a certificate\n")
    return path


def _truncated(pki: PKI) -> Path:
    path = pki.dir / "truncated.pem"
    path.write_bytes(pki.ca.read_bytes()[:120])
    return path


BAD = [
    pytest.param(
        lambda p: {"ca": str(p.dir / "missing.pem")},
        "pools.api.tls.ca: cannot read",
        "No such file",
        id="unreadable-ca",
    ),
    pytest.param(
        lambda p: {"ca": str(_not_pem(p))},
        "pools.api.tls.ca: ",
        "holds no PEM CA certificate",
        id="ca-not-pem",
    ),
    pytest.param(
        lambda p: {"ca": str(p.client[1])},
        "pools.api.tls.ca: ",
        "holds no PEM CA certificate",
        id="ca-is-a-key",
    ),
    pytest.param(
        lambda p: {"ca": str(_truncated(p))},
        "pools.api.tls.ca: ",
        "is not a PEM CA bundle",
        id="ca-cut-short",
    ),
    pytest.param(
        lambda p: {"cert": str(p.client[0]), "key": str(p.other_key)},
        "pools.api.tls.key: ",
        "does not match the certificate in 'cert'",
        id="mismatched-key",
    ),
    pytest.param(
        lambda p: {"key": str(p.client[1])},
        "pools.api.tls.key: ",
        "needs 'cert'",
        id="key-without-cert",
    ),
    pytest.param(
        lambda p: {"cert": str(p.client[0])},
        "pools.api.tls.cert: ",
        "holds no private key: name it in 'key'",
        id="cert-without-its-key",
    ),
    pytest.param(
        lambda p: {"cert": str(p.client[1]), "key": str(p.client[1])},
        "pools.api.tls.cert: ",
        "holds no PEM certificate",
        id="cert-not-pem",
    ),
    pytest.param(
        lambda p: {"cert": str(p.client[0]), "key": str(p.client[0])},
        "pools.api.tls.key: ",
        "holds no PEM private key",
        id="key-not-pem",
    ),
    pytest.param(
        lambda p: {"cert": str(p.client[0]), "key": str(p.dir / "gone.key")},
        "pools.api.tls.key: cannot read",
        "No such file",
        id="unreadable-key",
    ),
    pytest.param(
        lambda p: {"cert": str(p.client[0]), "key": str(_encrypted_key(p))},
        "pools.api.tls.key: ",
        "is encrypted",
        id="encrypted-key",
    ),
    pytest.param(
        lambda p: {"ca": str(p.ca), "verify": False},
        "pools.api.tls.ca: ",
        "never used with verify = false",
        id="ca-with-verify-off",
    ),
    pytest.param(
        lambda p: {"server_name": "api.internal:443"},
        "pools.api.tls.server_name: ",
        "must be a host name",
        id="server-name-with-port",
    ),
    pytest.param(
        lambda p: {"server_nmae": "api.internal"},
        "pools.api.tls.server_nmae: ",
        "did you mean 'server_name'?",
        id="misspelt-key",
    ),
    pytest.param(
        lambda p: {"ca": ""},
        "pools.api.tls.ca: ",
        "must name a file",
        id="empty-file-name",
    ),
    pytest.param(
        lambda p: {"verify": "no"},
        "pools.api.tls.verify: ",
        "must be true or false",
        id="verify-not-a-bool",
    ),
]


@pytest.mark.parametrize(("table", "where", "what"), BAD)
def test_bad_tls_is_a_config_error_naming_its_key(pki, table, where, what) -> None:
    config = {"pools": {"api": {"backends": ["https://127.0.0.1:9443"], "tls": table(pki)}}}
    with pytest.raises(ConfigError) as info:
        Balancer(config)
    message = str(info.value)
    assert message.startswith(where), message
    assert what in message, message


def test_every_bad_file_is_named_at_once(pki) -> None:
    table = {"ca": str(pki.dir / "missing.pem"), "cert": str(_not_pem(pki)), "key": "nope.key"}
    with pytest.raises(ConfigError) as info:
        Balancer({"pools": {"api": {"backends": [], "tls": table}}})
    assert [p.path for p in info.value.problems] == [
        "pools.api.tls.ca",
        "pools.api.tls.cert",
        "pools.api.tls.key",
    ]


def test_a_reload_with_bad_tls_changes_nothing(pki) -> None:
    good = {"pools": {"api": {"backends": ["https://127.0.0.1:9443"], "tls": {"ca": str(pki.ca)}}}}
    balancer = Balancer(good)
    pool, tls = balancer.pools["api"], balancer.pools["api"].tls
    bad = {"pools": {"api": {**good["pools"]["api"], "tls": {"ca": str(pki.dir / "gone.pem")}}}}
    with pytest.raises(ConfigError, match=r"^pools\.api\.tls\.ca: cannot read"):
        balancer.reload(bad)
    assert balancer.pools["api"] is pool and pool.tls is tls
