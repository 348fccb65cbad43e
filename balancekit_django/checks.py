"""``manage.py check``: configuration errors with their key paths, risky settings."""

from __future__ import annotations

import ipaddress
from typing import Any

from django.core.checks import Error, Tags, Warning, register

from balancekit import Balancer, ConfigError


@register(Tags.compatibility)
def check_balancekit(app_configs: Any = None, **kwargs: Any) -> list[Any]:
    from django.db import DatabaseError

    from .runtime import compose, database_config, settings_config

    messages: list[Any] = []
    try:
        base = settings_config()
    except ConfigError as exc:
        return [Error(str(p), id="balancekit.E001", obj="BALANCEKIT") for p in exc.problems]
    try:
        Balancer(base)
    except ConfigError as exc:
        messages += [Error(str(p), id="balancekit.E001", obj="BALANCEKIT") for p in exc.problems]
    try:
        pools, routes, _ = database_config()
    except DatabaseError:
        pools, routes = {}, []  # not migrated yet: nothing stored to check
    for name in sorted(pools.keys() & base.get("pools", {}).keys()):
        messages.append(
            Error(
                f"pool {name!r} is defined in BALANCEKIT and in the database",
                hint="Rename or delete one of them; the settings' pool is served meanwhile.",
                id="balancekit.E002",
            )
        )
    if pools:
        try:
            Balancer(compose(base, pools, routes))
        except ConfigError as exc:
            messages += [Error(f"in the database: {p}", id="balancekit.E003") for p in exc.problems]
    status = base.get("status") or {}
    if status.get("enabled") and not status.get("token") and not status.get("allow"):
        messages.append(
            Warning(
                "the status page is enabled without a token or an allow list",
                hint="Only staff users who are logged in can read it then; a monitoring "
                "system scraping metrics needs status.token or status.allow.",
                id="balancekit.W001",
            )
        )
    for network in base.get("trusted_proxies") or []:
        try:
            if ipaddress.ip_network(str(network), strict=False).prefixlen == 0:
                messages.append(
                    Warning(
                        f"trusted_proxies includes {network}: every client's X-Forwarded-For "
                        "is believed",
                        id="balancekit.W002",
                    )
                )
        except ValueError:
            pass  # reported as an error above
    return messages
