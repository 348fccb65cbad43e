"""The default sync transport: urllib3, one connection pool per backend and pool.

urllib3's ``HTTPConnectionPool`` is safe to share between threads and
checks each idle connection before reuse (a connection that has bytes
waiting, or was closed by the backend, is dropped rather than handed to
the next request). Nothing here outlives a fork: the engine that owns a
transport is rebuilt in the child.

A backend with its pool's TLS (``Backend.tls``) gets an
``HTTPSConnectionPool`` on the pool's context, its ``server_name`` as
urllib3's ``server_hostname`` (the name sent as SNI and the name the
standard library verifies). ``assert_hostname`` is not passed: urllib3 would
then switch ``check_hostname`` off on the context, which the pool's other
transports (and its health checks) share.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.exceptions import (
    ConnectTimeoutError,
    DecodeError,
    HTTPError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
)
from urllib3.util import SKIP_HEADER

from .._exceptions import (
    ProxyError,
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
)

if TYPE_CHECKING:
    from .._backend import Backend
    from .._config import TimeoutsConfig
    from .._types import RawHeaders
    from .._upstream_tls import UpstreamTLS

#: Bytes asked of the socket at once; a read returns what has arrived.
READ_SIZE = 64 * 1024
#: Idle keep-alive connections kept per backend (as the async transports).
KEEPALIVE_CONNECTIONS = 100

#: What the transport catches from urllib3; translate_error maps each.
URLLIB3_ERRORS = (HTTPError, OSError)


def translate_error(exc: BaseException) -> ProxyError:
    """The most specific balancekit error for one of urllib3's."""
    # NewConnectionError subclasses ConnectTimeoutError: test it first.
    if isinstance(exc, NewConnectionError):
        return UpstreamConnectError()
    if isinstance(exc, ConnectTimeoutError):
        return UpstreamTimeout.connecting()
    if isinstance(exc, ReadTimeoutError | TimeoutError):
        return UpstreamTimeout()
    if isinstance(exc, ProtocolError | DecodeError):
        # ProtocolError("Connection aborted.", cause): a reset is no
        # malformation, and a write that timed out is a timeout.
        cause = exc.args[1] if len(exc.args) > 1 else None
        if isinstance(cause, TimeoutError):
            return UpstreamTimeout()
        if not isinstance(cause, OSError):
            return UpstreamProtocolError()
    return UpstreamError()


class _WriteTimeout:
    """urllib3 sends a request under its connect timeout; this makes every
    write (request line, headers, each body chunk) wait at most ``write``."""

    write_timeout: float | None

    def send(self, data: Any) -> None:
        sock = self.sock  # type: ignore[attr-defined]
        if sock is not None and sock.gettimeout() != self.write_timeout:
            sock.settimeout(self.write_timeout)
        super().send(data)  # type: ignore[misc]


class _Connection(_WriteTimeout, HTTPConnection):
    def __init__(self, *args: Any, write_timeout: float | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.write_timeout = write_timeout


class _TLSConnection(_WriteTimeout, HTTPSConnection):
    def __init__(self, *args: Any, write_timeout: float | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.write_timeout = write_timeout


class _UnverifiedPool(urllib3.HTTPSConnectionPool):
    """A pool whose ``tls.verify = false``: said once at start-up, where
    urllib3 would warn (InsecureRequestWarning) on every request."""

    def _validate_conn(self, conn: Any) -> None:
        # HTTPSConnectionPool._validate_conn without its warning.
        if conn.is_closed:
            conn.connect()


def _checked_headers(response: urllib3.BaseHTTPResponse) -> RawHeaders:
    """The response's headers as raw pairs, or ``ValueError`` where
    ``http.client`` is lenient and aiohttp, httpx and NGINX are not: a
    Content-Length that is not one number, or a value holding NUL or a line
    break."""
    headers: RawHeaders = []
    length = None
    for name, value in response.headers.iteritems():
        raw_name = name.lower().encode("latin-1")
        raw_value = value.encode("latin-1")
        if b"\0" in raw_value or b"\r" in raw_value or b"\n" in raw_value:
            raise ValueError(f"control character in header {name}")
        if raw_name == b"content-length":
            if not raw_value.isdigit() or (length is not None and raw_value != length):
                raise ValueError("invalid Content-Length")
            length = raw_value
        headers.append((raw_name, raw_value))
    return headers


class Urllib3Response:
    __slots__ = ("_response", "done", "headers", "status")

    def __init__(self, response: urllib3.BaseHTTPResponse) -> None:
        self._response = response
        self.status = response.status
        self.headers = _checked_headers(response)
        self.done = False

    def read(self) -> bytes:
        try:
            chunk = self._response.read1(READ_SIZE)
        except URLLIB3_ERRORS as exc:
            raise translate_error(exc) from exc
        if not chunk:
            self.done = True
        return chunk

    def close(self) -> None:
        response = self._response
        if not self.done:
            # Unread bytes would answer the next request: drop the connection.
            response.close()
        response.release_conn()


class Urllib3Transport:
    name = "urllib3"

    def __init__(self) -> None:
        self._pools: dict[tuple[str, int, UpstreamTLS | None], urllib3.HTTPConnectionPool] = {}
        self._timeouts: dict[int, tuple[TimeoutsConfig, urllib3.Timeout]] = {}
        self._lock = threading.Lock()

    def _pool(self, backend: Backend, timeouts: TimeoutsConfig) -> urllib3.HTTPConnectionPool:
        key = (backend.origin, id(timeouts), backend.tls)
        found = self._pools.get(key)
        if found is None:
            with self._lock:
                found = self._pools.get(key)
                if found is None:
                    found = self._pools[key] = self._make_pool(backend, timeouts)
        return found

    def _make_pool(self, backend: Backend, timeouts: TimeoutsConfig) -> urllib3.HTTPConnectionPool:
        timeout = urllib3.Timeout(connect=timeouts.connect, read=timeouts.read)
        self._timeouts[id(timeouts)] = (timeouts, timeout)  # keeps the id valid
        options: dict[str, Any] = {
            "maxsize": KEEPALIVE_CONNECTIONS,
            "block": False,
            "retries": False,
            "timeout": timeout,
            "write_timeout": timeouts.write,
        }
        tls = backend.tls
        if tls is not None:
            cls = urllib3.HTTPSConnectionPool if tls.verify else _UnverifiedPool
            # cert_reqs left out: urllib3 takes the context's own verify_mode.
            pool: urllib3.HTTPConnectionPool = cls(
                backend.host,
                backend.port,
                ssl_context=tls.context,
                server_hostname=tls.server_name,
                **options,
            )
            pool.ConnectionCls = _TLSConnection
        elif backend.scheme == "https":
            pool = urllib3.HTTPSConnectionPool(
                backend.host, backend.port, cert_reqs="CERT_REQUIRED", **options
            )
            pool.ConnectionCls = _TLSConnection
        else:
            pool = urllib3.HTTPConnectionPool(backend.host, backend.port, **options)
            pool.ConnectionCls = _Connection
        return pool

    def send(
        self,
        backend: Backend,
        method: str,
        target: str,
        headers: RawHeaders,
        body: Iterable[bytes] | None,
        timeouts: TimeoutsConfig,
    ) -> Urllib3Response:
        fields = urllib3.HTTPHeaderDict()
        chunked = body is not None
        for name, value in headers:
            if name == b"content-length":
                chunked = False
            fields.add(name.decode("latin-1"), value.decode("latin-1"))
        # urllib3 would invent these when the client sent none.
        if "user-agent" not in fields:
            fields["user-agent"] = SKIP_HEADER
        if "accept-encoding" not in fields:
            fields["accept-encoding"] = SKIP_HEADER
        try:
            response = self._pool(backend, timeouts).urlopen(
                method,
                backend.base_path + target,
                body=body,
                headers=fields,
                retries=False,
                redirect=False,
                assert_same_host=False,
                preload_content=False,
                decode_content=False,
                release_conn=False,
                chunked=chunked,
            )
        except URLLIB3_ERRORS as exc:
            raise translate_error(exc) from exc
        try:
            return Urllib3Response(response)
        except ValueError as exc:
            response.close()  # what else it sent cannot be trusted either
            response.release_conn()
            raise UpstreamProtocolError() from exc

    def close(self) -> None:
        with self._lock:
            pools, self._pools = self._pools, {}
        for connection_pool in pools.values():
            connection_pool.close()
