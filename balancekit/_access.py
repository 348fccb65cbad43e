"""The access log: one line, or one JSON object, per proxied request.

Written to the ``balancekit.access`` logger at INFO, so that users'
handlers and formatters apply; nothing is built when the logger would drop
the record. The JSON form (``access_log = "json"``, CONTRACT section 15)
names what happened with reason flags as Envoy's response flags do:

====  ==============================================================
UH    no eligible backend
UO    every eligible backend at ``max_connections``, or the queue full
      or waited out: overflow rather than absence
UF    a connection to a backend failed
UT    a backend did not answer in time (or ``timeouts.total`` ran out)
UR    a backend reset the connection or sent a malformed answer
URX   a try failed, or answered a status in ``on_status``, and no
      retry was left (``attempts`` or the retry budget)
RS    an answer in ``on_status`` was retried
DC    the client left before the response was complete
====  ==============================================================

The record also rides on the log record as ``record.balancekit`` (a dict),
for handlers that write structured logs themselves.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from ._exceptions import (
    NoEligibleBackend,
    ProxyError,
    UpstreamConnectError,
    UpstreamTimeout,
)

if TYPE_CHECKING:
    from ._classify import Routed
    from ._engine_core import Attempts

access_logger = logging.getLogger("balancekit.access")


def flag_for(error: ProxyError) -> str:
    """The reason flag of a failure."""
    if isinstance(error, NoEligibleBackend):
        return "UO" if error.full else "UH"
    if isinstance(error, UpstreamTimeout):
        return "UT"
    if isinstance(error, UpstreamConnectError):
        return "UF"
    return "UR"


def log_access(
    routed: Routed,
    status: int,
    attempts: Attempts | None,
    *,
    started: float,
    sent: int,
    disconnected: bool,
) -> None:
    """Log one proxied request that ended with ``status`` (499 when the
    client left before any answer), ``sent`` body bytes to the client;
    ``started`` is its ``time.perf_counter()`` on arrival."""
    if not access_logger.isEnabledFor(logging.INFO):
        return
    try:
        _log(routed, status, attempts, started, sent, disconnected)
    except Exception:  # a user's handler or formatter: it must not break the request
        with contextlib.suppress(Exception):  # the same handler may fail again
            logging.getLogger("balancekit").exception("the access log failed")


def _log(
    routed: Routed,
    status: int,
    attempts: Attempts | None,
    started: float,
    sent: int,
    disconnected: bool,
) -> None:
    request = routed.request
    backend = attempts.tried[-1] if attempts is not None and attempts.tried else None
    latency = attempts.latency_ms if attempts is not None else None
    if routed.access_log != "json":
        access_logger.info(
            '%s "%s %s" %d pool=%s backend=%s %.1fms',
            request.client_ip or "-",
            request.method,
            routed.target,
            status,
            routed.pool.name,
            backend.url if backend else "-",
            latency or 0.0,
        )
        return
    flags = list(attempts.flags) if attempts is not None else []
    if disconnected and "DC" not in flags:
        flags.append("DC")
    query = request.query
    record = {
        "time": _timestamp(),
        "request_id": routed.request_id_text,
        "client": request.client_ip or None,
        "method": request.method,
        "target": request.path + (f"?{query}" if query else ""),
        "status": status,
        "pool": routed.pool.name,
        "backend": backend.url if backend else None,
        "attempts": attempts.attempt if attempts is not None else 0,
        "duration_ms": round((time.perf_counter() - started) * 1000.0, 3),
        "upstream_ms": None if latency is None else round(latency, 3),
        "bytes_sent": sent,
        "flags": flags,
    }
    _emit(json.dumps(record), record)


def _timestamp() -> str:
    """Now in ISO 8601, UTC, to the millisecond; the part to the second is
    formatted once per second (datetime.isoformat took 6 us per line)."""
    now = time.time()
    second = int(now)
    global _second, _second_text
    if second != _second:
        _second_text = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        _second = second
    return f"{_second_text}.{int((now - second) * 1000):03d}+00:00"


_second = -1
_second_text = ""


def _emit(message: str, record: dict[str, Any]) -> None:
    """One INFO record on the access logger, through its handlers, without
    ``Logger.info``'s walk up the stack for a caller nobody reads."""
    entry = access_logger.makeRecord(
        access_logger.name, logging.INFO, __file__, 0, message, (), None, "log_access",
        {"balancekit": record},
    )  # fmt: skip
    access_logger.handle(entry)
