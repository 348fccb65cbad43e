"""Every save or delete of a pool, backend or route bumps the version row."""

from __future__ import annotations

from typing import Any

from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver

from .models import Backend, Pool, Route, bump_version


@receiver([post_save, post_delete], sender=Pool)
@receiver([post_save, post_delete], sender=Backend)
@receiver([post_save, post_delete], sender=Route)
def _changed(sender: Any, **kwargs: Any) -> None:
    bump_version()
