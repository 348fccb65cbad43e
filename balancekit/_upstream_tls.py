"""TLS to a pool's backends: its ``tls`` table made into one SSL context.

The context is built once per pool, when the Balancer is built, and again
on a reload only when the table or one of its files changed (so a reload
picks up a rotated client certificate); never per request. Every
``https://`` backend of the pool carries a reference to the pool's
:class:`UpstreamTLS` (``Backend.tls``), and each transport hands its context
and server name to its library: httptools to ``create_connection``, aiohttp
per request, httpx through one client per context, urllib3 through one
connection pool per context. A backend without one is verified against the
system's CAs under its own host name, as before.

A file that cannot be read, holds no PEM, or a key that does not match its
certificate is a :class:`ConfigError` naming the key (``pools.api.tls.ca``).
"""

from __future__ import annotations

import os
import ssl
from typing import TYPE_CHECKING

from ._exceptions import ConfigError, Problem

if TYPE_CHECKING:
    from ._config import TLSConfig

#: What a file's (st_mtime_ns, st_size, st_ino) is for a file that is gone.
Stamp = tuple[int, int, int] | None

_CERTIFICATE = b"-----BEGIN CERTIFICATE-----"
_PRIVATE_KEY = b"PRIVATE KEY-----"  # also "EC PRIVATE KEY", "ENCRYPTED PRIVATE KEY"


class UpstreamTLS:
    """A pool's SSL context and the name its backends are verified under.

    Compared and hashed by identity: transports key their connection pools
    by it, so that pools with different TLS never share a connection, at the
    cost of one pointer hash.
    """

    __slots__ = ("config", "context", "server_name", "stamps", "verify")

    def __init__(
        self, config: TLSConfig, context: ssl.SSLContext, stamps: tuple[Stamp, ...]
    ) -> None:
        self.config = config
        self.context = context
        #: The SNI name and the name verified; None: each backend's host.
        self.server_name = config.server_name
        self.verify = config.verify
        #: The files' stamps when they were read, to tell a rotation on reload.
        self.stamps = stamps

    def __repr__(self) -> str:
        name = f" server_name={self.server_name}" if self.server_name else ""
        return f"<UpstreamTLS verify={self.verify}{name}>"


def upstream_tls(config: TLSConfig, where: str, previous: UpstreamTLS | None = None) -> UpstreamTLS:
    """The context for ``config`` (the table at key path ``where``).

    ``previous`` is returned as it is when its table is the same and none of
    its files changed since they were read. Raises :class:`ConfigError`.
    """
    stamps = _stamps(config)
    if previous is not None and previous.config == config and previous.stamps == stamps:
        return previous
    problems = _unreadable(config, where)
    if problems:
        raise ConfigError(problems)
    context = _context(config, where)
    # Only HTTP/1.1 is spoken upstream: say so to servers that offer h2.
    context.set_alpn_protocols(["http/1.1"])
    return UpstreamTLS(config, context, stamps)


def _files(config: TLSConfig) -> list[tuple[str, str]]:
    named = (("ca", config.ca), ("cert", config.cert), ("key", config.key))
    return [(key, path) for key, path in named if path is not None]


def _stamps(config: TLSConfig) -> tuple[Stamp, ...]:
    stamps: list[Stamp] = []
    for _, path in _files(config):
        try:
            stat = os.stat(path)
        except OSError:
            stamps.append(None)
        else:
            stamps.append((stat.st_mtime_ns, stat.st_size, stat.st_ino))
    return tuple(stamps)


def _unreadable(config: TLSConfig, where: str) -> list[Problem]:
    """A problem per file that cannot be read or holds no PEM of its kind,
    each at its own key (OpenSSL's own errors do not say which file)."""
    problems = []
    for key, path in _files(config):
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as exc:
            problems.append(Problem(f"{where}.{key}", f"cannot read {path!r}: {exc.strerror}"))
            continue
        if key in ("ca", "cert") and _CERTIFICATE not in data:
            what = "CA certificate" if key == "ca" else "certificate"
            problems.append(
                Problem(f"{where}.{key}", f"{path!r} holds no PEM {what} (-----BEGIN CERTIFICATE)")
            )
        elif key == "key" and _PRIVATE_KEY not in data:
            problems.append(Problem(f"{where}.key", f"{path!r} holds no PEM private key"))
    return problems


class _Encrypted(Exception):
    """OpenSSL asked for a key's password (it would prompt on the terminal)."""


def _no_password() -> str:
    raise _Encrypted


def _context(config: TLSConfig, where: str) -> ssl.SSLContext:
    if config.verify:
        try:
            context = ssl.create_default_context(cafile=config.ca)
        except (ssl.SSLError, OSError) as exc:
            reason = getattr(exc, "reason", None) or exc.strerror or exc
            raise ConfigError(
                [Problem(f"{where}.ca", f"{config.ca!r} is not a PEM CA bundle: {reason}")]
            ) from None
    else:
        # Nothing is checked: no CAs to load (verify = false excludes ``ca``).
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if config.cert is not None:
        _load_client_certificate(context, config, where)
    return context


def _load_client_certificate(context: ssl.SSLContext, config: TLSConfig, where: str) -> None:
    at = f"{where}.key" if config.key is not None else f"{where}.cert"
    try:
        context.load_cert_chain(config.cert or "", config.key, password=_no_password)
    except _Encrypted:
        message = "is encrypted: balancekit reads unencrypted keys only (openssl pkey -in KEY)"
        raise ConfigError([Problem(at, message)]) from None
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            message = f"{config.key or config.cert!r} does not match the certificate in 'cert'"
        elif config.key is None:
            message = f"{config.cert!r} holds no private key: name it in 'key'"
        else:
            message = f"cannot be loaded with 'cert': {exc.reason or exc}"
        raise ConfigError([Problem(at, message)]) from None
    except OSError as exc:  # a file that went between the check and the load
        raise ConfigError([Problem(at, f"cannot be read: {exc.strerror}")]) from None


__all__ = ["UpstreamTLS", "upstream_tls"]
