"""RFC 9457 problem details: every error answer balancekit writes itself."""

from __future__ import annotations

import json
from http import HTTPStatus

from ._exceptions import NoEligibleBackend, ProxyError

#: Seconds a client is told to wait when no backend is eligible.
RETRY_AFTER = 5

Answer = tuple[int, list[tuple[bytes, bytes]], bytes]

_STATUS_LINES = {int(s): f"{int(s)} {s.phrase}" for s in HTTPStatus}


def status_line(status: int) -> str:
    """``"200 OK"``: a status and its reason phrase (``Unknown`` for one
    :class:`http.HTTPStatus` does not name)."""
    return _STATUS_LINES.get(status) or f"{status} Unknown"


def problem(
    status: int,
    detail: str,
    *,
    pool: str | None = None,
    close: bool = False,
    retry_after: int | None = None,
) -> Answer:
    """Status, headers and body of a problem answer.

    ``status`` is any status :class:`http.HTTPStatus` names (its phrase is
    the title); ``pool`` names the pool, never a backend. ``close`` says
    ``Connection: close``: for a request refused for its framing, after
    which the connection cannot be trusted.
    """
    body: dict[str, object] = {
        "type": "about:blank",
        "title": HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
    }
    if pool:
        body["pool"] = pool
    payload = json.dumps(body).encode()
    headers = [
        (b"content-type", b"application/problem+json"),
        (b"content-length", str(len(payload)).encode()),
        (b"cache-control", b"no-store"),
    ]
    if retry_after is not None:
        headers.append((b"retry-after", str(retry_after).encode()))
    if close:
        headers.append((b"connection", b"close"))
    return status, headers, payload


def error_problem(error: ProxyError) -> Answer:
    """The problem answer for a request that could not be proxied."""
    retry_after = RETRY_AFTER if isinstance(error, NoEligibleBackend) else None
    return problem(error.status_code, error.detail, pool=error.pool, retry_after=retry_after)
