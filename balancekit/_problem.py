"""RFC 9457 problem details for the errors a client sees from balancekit."""

from __future__ import annotations

import json
from http import HTTPStatus

from ._exceptions import NoEligibleBackend, ProxyError

#: Seconds a client is told to wait when no backend is eligible.
RETRY_AFTER = 5


def problem_response(error: ProxyError) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """Status, headers and body for ``error``: names the pool, never a backend."""
    body = {
        "type": "about:blank",
        "title": error.title,
        "status": error.status_code,
        "detail": error.detail,
    }
    if error.pool:
        body["pool"] = error.pool
    payload = json.dumps(body).encode()
    headers = [
        (b"content-type", b"application/problem+json"),
        (b"content-length", str(len(payload)).encode()),
        (b"cache-control", b"no-store"),
    ]
    if isinstance(error, NoEligibleBackend):
        headers.append((b"retry-after", str(RETRY_AFTER).encode()))
    return error.status_code, headers, payload


def bad_request(detail: str, *, status: int = 400) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """A problem for a request balancekit refuses to forward (or could not
    serve): ``status`` is any status :class:`http.HTTPStatus` names."""
    title = HTTPStatus(status).phrase
    payload = json.dumps(
        {"type": "about:blank", "title": title, "status": status, "detail": detail}
    ).encode()
    return (
        status,
        [
            (b"content-type", b"application/problem+json"),
            (b"content-length", str(len(payload)).encode()),
            (b"connection", b"close"),
        ],
        payload,
    )
