"""Pools with their backends and routes; backends with their live state."""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from .models import Backend, Pool, Route
from .runtime import current

STATES = ("healthy", "unhealthy", "ejected", "draining", "disabled")


def _live(backend: Backend) -> Any:
    """This worker's running Backend for a row, or None."""
    pool = current().balancer.pools.get(backend.pool.name)
    return None if pool is None else pool.find(backend.url)


class BackendInline(admin.TabularInline):
    model = Backend
    extra = 1
    fields = ("url", "weight", "backup", "enabled", "draining")


class RouteInline(admin.TabularInline):
    """The pool's own routes, briefly; conditions, splits and per-route
    terms are edited on the route's page (JSON fields crowd a table row)."""

    model = Route
    extra = 0
    fields = ("prefix", "host", "strip_prefix", "rewrite")
    show_change_link = True


@admin.register(Pool)
class PoolAdmin(admin.ModelAdmin):
    list_display = ("name", "algorithm", "backend_count")
    search_fields = ("name",)
    inlines = (BackendInline, RouteInline)

    @admin.display(description="backends")
    def backend_count(self, pool: Pool) -> int:
        return pool.backends.count()


class StateFilter(admin.SimpleListFilter):
    title = "state"
    parameter_name = "state"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [(state, state) for state in STATES]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        wanted = self.value()
        if not wanted:
            return queryset
        ids = [row.pk for row in queryset.select_related("pool") if _state(row) == wanted]
        return queryset.filter(pk__in=ids)


def _state(row: Backend) -> str:
    live = _live(row)
    if live is None:  # not loaded in this worker yet
        return "disabled" if not row.enabled else "draining" if row.draining else "healthy"
    return str(live.state.value)


@admin.register(Backend)
class BackendAdmin(admin.ModelAdmin):
    list_display = (
        "url",
        "pool",
        "weight",
        "backup",
        "state",
        "in_flight",
        "requests",
        "failures",
        "latency",
    )
    list_filter = ("pool", StateFilter, "enabled", "draining")
    list_select_related = ("pool",)
    search_fields = ("url",)
    actions = ("enable", "disable", "drain")

    @admin.display(description="state")
    def state(self, row: Backend) -> str:
        return _state(row)

    @admin.display(description="in flight")
    def in_flight(self, row: Backend) -> Any:
        live = _live(row)
        return "-" if live is None else live.active_requests

    @admin.display(description="requests")
    def requests(self, row: Backend) -> Any:
        live = _live(row)
        return "-" if live is None else live.requests_total

    @admin.display(description="failures")
    def failures(self, row: Backend) -> Any:
        live = _live(row)
        return "-" if live is None else live.failures_total

    @admin.display(description="latency ms")
    def latency(self, row: Backend) -> str:
        live = _live(row)
        if live is None or live.latency_ewma_ms is None:
            return "-"
        return f"{live.latency_ewma_ms:.1f}"

    def _act(self, request: HttpRequest, queryset: QuerySet[Any], verb: str, **flags: bool) -> None:
        count = queryset.update(**flags)  # bumps the version: every worker follows
        self.message_user(
            request,
            f"{verb} {count} backend(s); every worker follows within seconds.",
            messages.SUCCESS,
        )

    @admin.action(description="Enable selected backends", permissions=["change"])
    def enable(self, request: HttpRequest, queryset: QuerySet[Any]) -> None:
        self._act(request, queryset, "Enabled", enabled=True, draining=False)

    @admin.action(description="Disable selected backends (no traffic)", permissions=["change"])
    def disable(self, request: HttpRequest, queryset: QuerySet[Any]) -> None:
        self._act(request, queryset, "Disabled", enabled=False)

    @admin.action(description="Drain selected backends (sessions finish)", permissions=["change"])
    def drain(self, request: HttpRequest, queryset: QuerySet[Any]) -> None:
        self._act(request, queryset, "Draining", draining=True)


@admin.register(Route)
class RouteAdmin(admin.ModelAdmin):
    list_display = ("prefix", "host", "method_list", "target", "upstream_path")
    list_filter = ("pool",)
    list_select_related = ("pool",)
    search_fields = ("prefix", "host")
    fieldsets = (
        ("Match", {"fields": ("prefix", "host", "methods", "headers")}),
        ("Send to", {"fields": ("pool", "split", "split_key")}),
        ("Upstream path", {"fields": ("strip_prefix", "rewrite")}),
        (
            "This route's own terms (override the pool's)",
            {"fields": ("timeouts", "retries"), "classes": ("collapse",)},
        ),
    )

    @admin.display(description="methods")
    def method_list(self, route: Route) -> str:
        return ", ".join(map(str, route.methods)) if route.methods else "any"

    @admin.display(description="to")
    def target(self, route: Route) -> str:
        if isinstance(route.split, dict):
            return ", ".join(f"{name} {share}%" for name, share in route.split.items())
        return "-" if route.pool is None else route.pool.name

    @admin.display(description="upstream path")
    def upstream_path(self, route: Route) -> str:
        if route.rewrite:
            return f"prefix -> {route.rewrite}"
        return "prefix stripped" if route.strip_prefix else "as requested"
