"""OpenTelemetry spans per try (CONTRACT section 15), with ``tracing = true``.

Imported only then: without it nothing of OpenTelemetry is loaded. Each try
is a CLIENT span named after the method, a child of the current span (the
app's server span under auto-instrumentation, or the SERVER span that
``balancekit serve`` opens), with the stable HTTP semantic-convention
attributes; its W3C context goes upstream through the global propagator,
in place of whatever trace headers the client sent.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from opentelemetry import propagate, trace

if TYPE_CHECKING:
    from ._backend import Backend
    from ._request import RequestInfo
    from ._types import RawHeaders

_CLIENT = trace.SpanKind.CLIENT


class Tracing:
    """Starts, fills and ends the spans of tries; one per balancer."""

    def __init__(self) -> None:
        self.tracer = trace.get_tracer("balancekit")

    def start(
        self, request: RequestInfo, pool: str, backend: Backend, target: str, attempt: int
    ) -> Any:
        """The span of one try, begun now as a child of the current span."""
        attributes: dict[str, Any] = {
            "http.request.method": request.method,
            "server.address": backend.host,
            "server.port": backend.port,
            "url.full": backend.url + target,
            "balancekit.pool": pool,
            "balancekit.backend": backend.url,
        }
        if attempt > 1:
            attributes["http.request.resend_count"] = attempt - 1
        return self.tracer.start_span(request.method, kind=_CLIENT, attributes=attributes)

    def inject(self, span: Any, headers: RawHeaders) -> RawHeaders:
        """``headers`` with the try's trace context in place of the client's."""
        carrier: dict[str, str] = {}
        propagate.inject(carrier, context=trace.set_span_in_context(span))
        fields = propagate.get_global_textmap().fields
        kept = [(name, value) for name, value in headers if name.decode("latin-1") not in fields]
        kept += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in carrier.items()]
        return kept

    def end(self, span: Any, status: int | None, error: str | None) -> None:
        """End a try: with the answer's ``status`` when one came, and
        ``error`` (an exception's name, or a 5xx status) when it failed."""
        if status is not None:
            span.set_attribute("http.response.status_code", status)
            if status >= 500 and error is None:
                error = str(status)
        if error is not None:
            span.set_attribute("error.type", error)
            span.set_status(trace.StatusCode.ERROR)
        span.end()


class ServerSpan:
    """An ASGI wrapper that opens a SERVER span for each HTTP request that
    arrives without a current span (``balancekit serve``: no app to have
    one), from the client's trace headers when it sent some."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.tracer = trace.get_tracer("balancekit")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.app, name)  # the wrapped middleware's startup(), say

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or trace.get_current_span().get_span_context().is_valid:
            await self.app(scope, receive, send)
            return
        carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        parent = propagate.extract(carrier)
        status: list[int] = []

        async def watch(message: Any) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        method = scope["method"]
        attributes = {"http.request.method": method, "url.path": scope["path"]}
        with self.tracer.start_as_current_span(
            method, context=parent, kind=trace.SpanKind.SERVER, attributes=attributes
        ) as span:
            try:
                await self.app(scope, receive, watch)
            finally:
                if status:
                    span.set_attribute("http.response.status_code", status[0])
                    if status[0] >= 500:
                        span.set_status(trace.StatusCode.ERROR)
