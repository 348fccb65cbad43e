"""The status path: ``status.json`` and a plain HTML page, behind guards."""

from __future__ import annotations

import hmac
import html
import json
from typing import TYPE_CHECKING
from urllib.parse import parse_qs

from .._forwarding import TrustedProxies

if TYPE_CHECKING:
    from .._balancer import Balancer
    from .._types import RawHeaders, Send


class StatusEndpoint:
    """Serves ``status.json`` and the status page under the configured path.

    Off unless ``[status] enabled``: it reveals backend addresses. With
    ``token`` set, a request must carry ``Authorization: Bearer <token>`` or
    ``?token=<token>``; with ``allow`` set, only clients in those CIDRs see it.
    """

    def __init__(self, balancer: Balancer) -> None:
        config = balancer.config.status
        self.balancer = balancer
        self.path = config.path
        self.token = config.token.encode()
        self.allow = TrustedProxies(config.allow) if config.allow else None

    def matches(self, path: str) -> bool:
        return path.startswith(self.path) or path == self.path[:-1]

    def allowed(self, client_ip: str, headers: RawHeaders, query: str) -> bool:
        if self.allow is not None and client_ip not in self.allow:
            return False
        if not self.token:
            return True
        for name, value in headers:
            if name == b"authorization" and value[:7].lower() == b"bearer ":
                return hmac.compare_digest(value[7:].strip(), self.token)
        supplied = parse_qs(query).get("token", [""])[0].encode()
        return hmac.compare_digest(supplied, self.token)

    def respond(
        self, path: str, client_ip: str, headers: RawHeaders, query: str
    ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        """Status, headers and body for a request under the status path."""
        if not self.allowed(client_ip, headers, query):
            return _answer(403, b"text/plain; charset=utf-8", b"forbidden\n")
        rest = path[len(self.path) :] if path.startswith(self.path) else ""
        if rest == "status.json":
            body = json.dumps(self.balancer.status()).encode()
            return _answer(200, b"application/json", body)
        if rest == "":
            return _answer(200, b"text/html; charset=utf-8", render_page(self.balancer))
        return _answer(404, b"text/plain; charset=utf-8", b"not found\n")

    async def handle(
        self, path: str, client_ip: str, headers: RawHeaders, query: str, send: Send
    ) -> None:
        status, response_headers, body = self.respond(path, client_ip, headers, query)
        await send({"type": "http.response.start", "status": status, "headers": response_headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})


def _answer(
    status: int, content_type: bytes, body: bytes
) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    headers = [
        (b"content-type", content_type),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
    ]
    return status, headers, body


def render_page(balancer: Balancer) -> bytes:
    """A plain HTML table of every pool and backend; refreshes every 2 s."""
    rows = []
    for name, pool in balancer.status()["pools"].items():
        for b in pool["backends"]:
            latency = "-" if b["latency_ewma_ms"] is None else f"{b['latency_ewma_ms']:.1f}"
            cells = [
                name,
                pool["algorithm"],
                b["url"],
                b["state"],
                b["weight"],
                b["active_requests"],
                b["requests_total"],
                b["failures_total"],
                latency,
            ]
            tds = "".join(f"<td>{html.escape(str(c))}</td>" for c in cells)
            rows.append(f'<tr class="{b["state"]}">{tds}</tr>')
    head = "".join(
        f"<th>{h}</th>"
        for h in (
            "pool",
            "algorithm",
            "backend",
            "state",
            "weight",
            "in flight",
            "requests",
            "failures",
            "latency ms (EWMA)",
        )
    )
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="refresh" content="2">
<title>balancekit status</title>
<style>
body{{font:14px system-ui,sans-serif;margin:1.5rem}}
table{{border-collapse:collapse}}
td,th{{padding:.3rem .7rem;border-bottom:1px solid #ddd;text-align:left}}
.healthy td:nth-child(4){{color:#17692a}}
.unhealthy td:nth-child(4),.ejected td:nth-child(4){{color:#b3261e}}
.draining td:nth-child(4),.disabled td:nth-child(4){{color:#8a5a00}}
</style></head><body>
<h1>balancekit</h1>
<table><thead><tr>{head}</tr></thead><tbody>
{"".join(rows)}
</tbody></table>
<p><a href="status.json">status.json</a></p>
</body></html>
"""
    return page.encode()
