"""``type = "cookie"``: the client carries a signed pin to its backend."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .._backend import Backend
    from .._pool import Pool
    from .._request import RequestInfo
    from .._types import RawHeaders

#: RFC 6265 cookie-name: an HTTP token.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def seconds(option: str, value: object) -> float:
    """``value`` as a positive number of seconds, or ValueError naming ``option``."""
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ValueError(f"{option}: must be a positive number of seconds, got {value!r}")
    return float(value)


def backend_token(key: bytes, pool: str, url: str) -> str:
    """The cookie value that pins to ``url``: HMAC-SHA256 under ``key``,
    96 bits, URL-safe. It names the backend without revealing its address,
    and cannot be made for any backend without the secret."""
    mac = hmac.new(key, f"balancekit:{pool}:{url}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac[:12]).decode("ascii")


class CookiePersistence:
    """Pins a client to a backend with a signed cookie (HAProxy's ``cookie
    insert``, NGINX's ``sticky cookie``).

    ``Set-Cookie: <name>=<value>; HttpOnly; Path=/; SameSite=Lax`` (with
    ``Max-Age`` when ``max_age`` is set, and ``Secure`` when the client came
    over https). The value is :func:`backend_token` under the first secret;
    a value made under any of the secrets is honoured, so secrets can be
    rotated without losing sessions. A tampered, stale (its backend left)
    or foreign value is ignored, and the response carries a new pin.
    """

    name = "cookie"

    def __init__(
        self,
        *,
        pool: str,
        secrets: list[str],
        name: str | None = None,
        max_age: int | None = None,
    ) -> None:
        # Options come from a config file: their types are checked here.
        cookie: object = name if name is not None else f"balancekit_{pool}"
        if not isinstance(cookie, str) or not _TOKEN.fullmatch(cookie):
            raise ValueError(f"name: must be a cookie name (an HTTP token), got {cookie!r}")
        if max_age is not None:
            max_age = int(seconds("max_age", max_age))
        if not secrets:
            raise ValueError("cookie persistence signs its cookies: set the top-level 'secret'")
        self.cookie = cookie
        self.pool = pool
        self.keys = [secret.encode() for secret in secrets]
        attributes = "; HttpOnly; Path=/; SameSite=Lax"
        if max_age is not None:
            attributes += f"; Max-Age={max_age}"
        self._attributes = attributes
        # token -> backend for every secret, rebuilt when membership changes
        self._tokens: dict[str, Backend] = {}
        self._own: dict[Backend, str] = {}
        self._membership = -1
        self._lock = threading.Lock()

    def _tables(self, pool: Pool) -> tuple[dict[str, Backend], dict[Backend, str]]:
        if self._membership != pool.membership:
            with self._lock:
                backends = list(pool.backends)
                tokens = {
                    backend_token(key, self.pool, b.url): b for key in self.keys for b in backends
                }
                own = {b: backend_token(self.keys[0], self.pool, b.url) for b in backends}
                self._tokens, self._own, self._membership = tokens, own, pool.membership
        return self._tokens, self._own

    def find(self, request: RequestInfo, pool: Pool) -> Backend | None:
        value = request.cookies.get(self.cookie) if request.raw_headers else None
        if not value:
            return None
        backend = self._tables(pool)[0].get(value)
        if backend is None or backend.removed:
            return None
        return backend

    async def afind(self, request: RequestInfo, pool: Pool) -> Backend | None:
        return self.find(request, pool)

    def remember(self, request: RequestInfo, backend: Backend, pool: Pool) -> RawHeaders:
        token = self._tables(pool)[1].get(backend)
        if token is None:  # added since the tables were built
            token = backend_token(self.keys[0], self.pool, backend.url)
        secure = "; Secure" if request.scheme == "https" else ""
        cookie = f"{self.cookie}={token}{self._attributes}{secure}"
        return [(b"set-cookie", cookie.encode("latin-1"))]

    async def aremember(self, request: RequestInfo, backend: Backend, pool: Pool) -> RawHeaders:
        return self.remember(request, backend, pool)
