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
        if rest == "metrics":
            metrics = self.balancer.metrics
            if metrics is None:
                body = b"metrics need prometheus-client: pip install 'balancekit[prometheus]'\n"
                return _answer(404, b"text/plain; charset=utf-8", body)
            body, content_type = metrics.exposition()
            return _answer(200, content_type, body)
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


#: Columns of the status table: heading, and the status.json field shown.
COLUMNS = (
    ("pool", "pool"),
    ("backend", "url"),
    ("source", "source"),
    ("state", "state"),
    ("weight", "weight"),
    ("in flight", "active_requests"),
    ("req/s", "rps"),
    ("p50 ms", "latency_p50_ms"),
    ("p99 ms", "latency_p99_ms"),
    ("requests", "requests_total"),
    ("failures", "failures_total"),
    ("last check", "last_check"),
    ("last minutes", "spark"),
)


def _cell(backend: dict[str, object], field: str) -> str:
    value = backend.get(field)
    if field in ("rps", "spark"):
        return "-"
    if field == "last_check":
        check = backend.get("last_check")
        return "-" if not isinstance(check, dict) else ("pass" if check.get("ok") else "FAIL")
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def render_page(balancer: Balancer) -> bytes:
    """The dashboard: a plain table that a script keeps live (status.json
    every 2 s: states, req/s, latency and a sparkline per backend). Without
    JavaScript the table is still there, refreshed by the page every 5 s.
    Self-contained: nothing is fetched from anywhere else."""
    rows = []
    for name, pool in balancer.status()["pools"].items():
        for b in pool["backends"]:
            b = {**b, "pool": name}
            cells = "".join(
                f'<td data-label="{html.escape(label)}">{html.escape(_cell(b, field))}</td>'
                for label, field in COLUMNS
            )
            rows.append(f'<tr class="{b["state"]}">{cells}</tr>')
    head = "".join(f"<th>{html.escape(label)}</th>" for label, _ in COLUMNS)
    # With the admin API on, the script offers drain/disable/enable to a
    # page opened with the admin token in its fragment (#admin=TOKEN): a
    # fragment is never sent to the server nor written to its logs.
    admin = balancer.admin_endpoint
    body = f' data-admin="{html.escape(admin.path)}"' if admin is not None else ""
    return (
        _PAGE.replace("{body}", body)
        .replace("{head}", head)
        .replace("{rows}", "".join(rows))
        .replace("{script}", _SCRIPT)
    ).encode()


_PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<noscript><meta http-equiv="refresh" content="5"></noscript>
<title>balancekit</title>
<style>
:root{--ok:#17692a;--bad:#b3261e;--warn:#8a5a00;--line:#ddd;font:14px system-ui,sans-serif}
body{margin:1rem 1.5rem;color:#1d1d1f}
h1{font-size:1.3rem;margin:.2rem 0 .8rem}
#meta{color:#666;margin-bottom:.8rem}
table{border-collapse:collapse;width:100%}
th,td{padding:.35rem .6rem;border-bottom:1px solid var(--line);text-align:left;white-space:nowrap}
th{font-weight:600;background:#f6f6f6}
td[data-label="state"]{font-weight:600}
tr.healthy td[data-label="state"]{color:var(--ok)}
tr.unhealthy td[data-label="state"],tr.ejected td[data-label="state"]{color:var(--bad)}
tr.draining td[data-label="state"],tr.disabled td[data-label="state"]{color:var(--warn)}
td[data-label="state"]::before{content:"\25CF\00a0"}
svg{display:block}
td[data-label="actions"] button{font:inherit;margin-right:.3rem;padding:.1rem .5rem;cursor:pointer}
@media (max-width:700px){
 thead{display:none}
 table,tbody,tr,td{display:block;width:auto}
 tr{border:1px solid var(--line);border-radius:6px;margin:0 0 .8rem;padding:.3rem}
 td{border:0;padding:.15rem .4rem;white-space:normal}
 td::before{content:attr(data-label) ": ";color:#666;font-weight:400}
 td[data-label="state"]::before{content:"state: \25CF\00a0";color:inherit}
}
</style></head><body{body}>
<h1>balancekit</h1>
<div id="meta">live from <a href="status.json">status.json</a>, every 2 s</div>
<table><thead><tr>{head}</tr></thead><tbody id="rows">{rows}</tbody></table>
<script>{script}</script>
</body></html>
"""

_SCRIPT = r"""
(function () {
  var history = {}, last = {}, labels = ["pool", "backend", "source", "state", "weight",
    "in flight", "req/s", "p50 ms", "p99 ms", "requests", "failures", "last check",
    "last minutes"];
  function num(v, digits) { return v === null || v === undefined ? "-" : v.toFixed(digits); }
  function spark(points) {
    if (points.length < 2) return "";
    var w = 120, h = 24, max = Math.max.apply(null, points.concat([1]));
    var step = w / (points.length - 1), d = points.map(function (p, i) {
      return (i * step).toFixed(1) + "," + (h - 2 - (p / max) * (h - 4)).toFixed(1);
    }).join(" ");
    return '<svg width="' + w + '" height="' + h + '" role="img" aria-label="requests per ' +
      'second, last minutes"><polyline fill="none" stroke="#3367d6" stroke-width="1.5" ' +
      'points="' + d + '"/></svg>';
  }
  function cell(label, text, html) {
    var td = document.createElement("td");
    td.setAttribute("data-label", label);
    if (html) td.innerHTML = html; else td.textContent = text;
    return td;
  }
  var adminPath = document.body.getAttribute("data-admin");
  var adminToken = (location.hash.match(/[#&]admin=([^&]+)/) || [])[1];
  var actions = adminPath && adminToken ? ["drain", "disable", "enable"] : [];
  if (actions.length) {
    var th = document.createElement("th");
    th.textContent = "actions";
    document.querySelector("thead tr").appendChild(th);
  }
  function act(pool, url, action) {
    fetch(adminPath + "pools/" + encodeURIComponent(pool) + "/backends/" +
          encodeURIComponent(url) + "/" + action,
          {method: "POST", headers: {"Authorization": "Bearer " + decodeURIComponent(adminToken)}})
      .then(function (r) {
        return r.ok ? r.json() : r.json().then(function (p) { return Promise.reject(p.detail); });
      })
      .then(function () { tick(true); })
      .catch(function (e) { document.getElementById("meta").textContent = action + ": " + e; });
  }
  function buttons(pool, b) {
    var td = cell("actions", "");
    actions.forEach(function (action) {
      var button = document.createElement("button");
      button.type = "button";
      button.textContent = action.charAt(0).toUpperCase() + action.slice(1);
      button.setAttribute("data-action", action);
      button.onclick = function () { act(pool, b.url, action); };
      td.appendChild(button);
    });
    return td;
  }
  function render(status, now) {
    var body = document.createElement("tbody");
    body.id = "rows";
    Object.keys(status.pools).forEach(function (name) {
      var pool = status.pools[name];
      pool.backends.forEach(function (b) {
        var key = name + " " + b.url, prev = last[key], rps = null;
        if (prev && now > prev.at) {
          rps = Math.max(0, (b.requests_total - prev.total) / ((now - prev.at) / 1000));
        }
        last[key] = {total: b.requests_total, at: now};
        var points = (history[key] || []).concat(rps === null ? [] : [rps]).slice(-90);
        history[key] = points;
        var check = b.last_check ? (b.last_check.ok ? "pass" : "FAIL") : "-";
        var tr = document.createElement("tr");
        tr.className = b.state;
        [name, b.url, b.source || "-", b.state, String(b.weight), String(b.active_requests),
         num(rps, 1), num(b.latency_p50_ms, 1), num(b.latency_p99_ms, 1),
         String(b.requests_total), String(b.failures_total), check].forEach(function (text, i) {
          tr.appendChild(cell(labels[i], text));
        });
        tr.appendChild(cell(labels[12], "", spark(points)));
        if (actions.length) tr.appendChild(buttons(name, b));
        body.appendChild(tr);
      });
    });
    var old = document.getElementById("rows");
    old.parentNode.replaceChild(body, old);
    document.getElementById("meta").innerHTML = 'live from <a href="status.json' +
      location.search + '">status.json</a>, updated ' + new Date(now).toLocaleTimeString();
  }
  function tick(once) {
    fetch("status.json" + location.search, {cache: "no-store"})
      .then(function (r) { return r.ok ? r.json() : Promise.reject(r.status); })
      .then(function (status) { render(status, Date.now()); })
      .catch(function (e) { document.getElementById("meta").textContent = "status.json: " + e; })
      .finally(function () { if (!once) setTimeout(tick, 2000); });
  }
  tick();
})();
"""
