"""HTTP health check: GET a path, expect a status in a range."""

from __future__ import annotations

import aiohttp

from .._backend import Backend


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
        self._session: aiohttp.ClientSession | None = None

    async def check(self, backend: Backend) -> bool:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                cookie_jar=aiohttp.DummyCookieJar(),
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                connector=aiohttp.TCPConnector(force_close=True),
            )
        url = f"{backend.origin}{backend.base_path}{self.path}"
        try:
            async with self._session.request(
                self.method, url, headers=self.headers, allow_redirects=False
            ) as response:
                if not any(lo <= response.status <= hi for lo, hi in self.ranges):
                    return False
                if self.expect_body is None:
                    return True
                body = b""
                while len(body) < BODY_LIMIT:
                    chunk = await response.content.read(BODY_LIMIT - len(body))
                    if not chunk:
                        break
                    body += chunk
                    if self.expect_body in body:
                        return True
        except (aiohttp.ClientError, TimeoutError, OSError):
            return False
        return False

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
