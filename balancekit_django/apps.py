from __future__ import annotations

from django.apps import AppConfig


class BalancekitConfig(AppConfig):
    name = "balancekit_django"
    label = "balancekit"
    verbose_name = "balancekit"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from . import checks, signals  # noqa: F401 -- registers them
