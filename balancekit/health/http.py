"""HTTP health check: GET a path, expect a status in a range.

Probes go over balancekit's own HTTP/1.1 client, one connection per probe
(``Connection: close``, as HAProxy's checks), so that a backend that stops
accepting connections fails its check.
"""

from __future__ import annotations

import asyncio

from .._backend import Backend
from .._config import TimeoutsConfig
from .._exceptions import ProxyError
from .._transports.httptools import HttptoolsResponse, HttptoolsTransport


def parse_status_ranges(spec: str) -> list[tuple[int, int]]:
    """``"200-399,418"`` -> ``[(200, 399), (418, 418)]``; ValueError when malformed."""
    ranges = []
    for part in spec.split(","):
        low, _, high = part.strip().partition("-")
        try:
            lo, hi = int(low), int(high or low)
        except ValueError:
            lo = hi = 0
        if not 100 <= lo <= hi <= 599:
            raise ValueError(
                f"expect_status: must be status codes or ranges such as '200-399', got {spec!r}"
            )
        ranges.append((lo, hi))
    return ranges


#: How much of a check's answer is searched for ``expect_body``.
BODY_LIMIT = 64 * 1024


class HTTPHealthCheck:
    """Healthy when ``method path`` answers within ``timeout`` with a status
    in ``expect_status`` (ranges such as ``"200-399"`` or ``"200,204"``) and,
    when ``expect_body`` is set, with that text in the first 64 KiB of the
    body (as HAProxy's ``http-check expect string``)."""

    name = "http"

    def __init__(
        self,
        *,
        path: str = "/",
        timeout: float = 1.0,
        expect_status: str = "200-399",
        method: str = "GET",
        headers: dict[str, str] | None = None,
        expect_body: str | None = None,
    ) -> None:
        if not path.startswith("/"):
            raise ValueError(f"path: must start with '/', got {path!r}")
        if not timeout > 0:
            raise ValueError(f"timeout: must be a positive number of seconds, got {timeout!r}")
        self.path = path
        self.timeout = timeout
        self.ranges = parse_status_ranges(expect_status)
        self.method = method
        self.headers = dict(headers or {})
        if expect_body is not None and not expect_body:
            raise ValueError(
                "expect_body: must not be empty (leave it out to check the status only)"
            )
        self.expect_body = None if expect_body is None else expect_body.encode()
        extra = [
            (name.lower().encode("latin-1"), value.encode("latin-1"))
            for name, value in self.headers.items()
        ]
        self._extra = [h for h in extra if h[0] not in (b"host", b"connection")]
        self._host = next((v for k, v in extra if k == b"host"), None)
        self._timeouts = TimeoutsConfig(connect=timeout, read=timeout, write=timeout)
        self._transport = HttptoolsTransport()

    async def check(self, backend: Backend) -> bool:
        host = self._host or backend.host_header_raw
        headers = [(b"host", host), (b"connection", b"close"), *self._extra]
        try:
            async with asyncio.timeout(self.timeout):
                response = await self._transport.send(
                    backend, self.method, self.path, headers, None, self._timeouts
                )
                try:
                    return await self._judge(response)
                finally:
                    await response.aclose()
        except (ProxyError, TimeoutError, OSError):
            return False

    async def _judge(self, response: HttptoolsResponse) -> bool:
        if not any(lo <= response.status <= hi for lo, hi in self.ranges):
            return False
        if self.expect_body is None:
            return True
        body = b""
        while len(body) < BODY_LIMIT:
            chunk = await response.read()
            if not chunk:
                break
            body += chunk
            if self.expect_body in body:
                return True
        return False

    async def aclose(self) -> None:
        await self._transport.aclose()
