"""Pools, backends and routes kept in the database and managed in the admin."""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ValidationError
from django.db import models, transaction
from django.db.models import F

from balancekit import ConfigError, load_config
from balancekit.adapter import validate_backend


def bump_version() -> None:
    """Tell every worker that the database's pools changed (in the caller's
    transaction, so the change and the news of it commit together)."""
    with transaction.atomic():
        updated = State.objects.filter(pk=1).update(version=F("version") + 1)
        if not updated:
            State.objects.get_or_create(pk=1, defaults={"version": 1})


class VersionedQuerySet(models.QuerySet[Any]):
    """``update``, ``bulk_update``, ``bulk_create`` and ``delete`` send no
    signals: these bump the version themselves."""

    def update(self, **kwargs: Any) -> int:
        with transaction.atomic(using=self.db):
            count = super().update(**kwargs)
            bump_version()
        return count

    def bulk_update(self, objs: Any, fields: Any, batch_size: int | None = None) -> int:
        with transaction.atomic(using=self.db):
            count = super().bulk_update(objs, fields, batch_size=batch_size)
            bump_version()
        return count

    def bulk_create(self, objs: Any, *args: Any, **kwargs: Any) -> list[Any]:
        with transaction.atomic(using=self.db):
            created = super().bulk_create(objs, *args, **kwargs)
            bump_version()
        return created

    def delete(self) -> tuple[int, dict[str, int]]:
        with transaction.atomic(using=self.db):
            deleted = super().delete()
            bump_version()
        return deleted


def _validation_error(error: ConfigError, prefix: str = "") -> ValidationError:
    """A ConfigError's key-path messages, as the admin shows them."""
    return ValidationError([f"{prefix}{problem}" for problem in error.problems])


class Pool(models.Model):
    name = models.SlugField(max_length=100, unique=True)
    algorithm = models.CharField(max_length=100, default="round_robin")
    algorithm_options = models.JSONField(
        default=dict, blank=True, help_text='The algorithm\'s own keys, e.g. {"key": "ip"}.'
    )
    settings = models.JSONField(
        default=dict,
        blank=True,
        help_text="Other pool keys, as in BALANCEKIT: health_check, persistence, timeouts, "
        "retries, max_connections, outlier_detection...",
    )

    objects = VersionedQuerySet.as_manager()

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def as_config(self, backends: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            **(self.settings or {}),
            "algorithm": {"name": self.algorithm, **(self.algorithm_options or {})},
            "backends": backends,
        }

    def clean(self) -> None:
        # The same validation as the core: the admin shows ConfigError's key paths.
        if not isinstance(self.settings, dict) or "backends" in self.settings:
            raise ValidationError({"settings": "must be a JSON object without 'backends'"})
        if not isinstance(self.algorithm_options, dict):
            raise ValidationError({"algorithm_options": "must be a JSON object"})
        try:
            from balancekit import Balancer

            Balancer({"secret": "-", "pools": {self.name or "pool": self.as_config([])}})
        except ConfigError as exc:
            raise _validation_error(exc) from None


class Backend(models.Model):
    pool = models.ForeignKey(Pool, on_delete=models.CASCADE, related_name="backends")
    url = models.CharField(max_length=500)
    weight = models.PositiveIntegerField(default=1)
    backup = models.BooleanField(default=False)
    enabled = models.BooleanField(default=True)
    draining = models.BooleanField(default=False)

    objects = VersionedQuerySet.as_manager()

    class Meta:
        ordering = ["pool__name", "id"]
        constraints = [
            models.UniqueConstraint(fields=["pool", "url"], name="balancekit_backend_url")
        ]

    def __str__(self) -> str:
        return self.url

    def clean(self) -> None:
        try:
            validate_backend(self.url, self.weight, backup=self.backup)
        except ConfigError as exc:
            raise ValidationError({"url": [str(p) for p in exc.problems]}) from None


class Route(models.Model):
    prefix = models.CharField(max_length=500, unique=True)
    pool = models.ForeignKey(Pool, on_delete=models.CASCADE, related_name="routes")
    strip_prefix = models.BooleanField(default=False)

    objects = VersionedQuerySet.as_manager()

    class Meta:
        ordering = ["prefix"]

    def __str__(self) -> str:
        return f"{self.prefix} -> {self.pool}"

    def clean(self) -> None:
        try:
            load_config({"routes": [{"prefix": self.prefix, "pool": "p"}], "pools": {"p": {}}})
        except ConfigError as exc:
            raise ValidationError({"prefix": [str(p) for p in exc.problems]}) from None


class State(models.Model):
    """One row: a counter bumped with every change of the tables above,
    which each worker polls (as django-celery-beat's PeriodicTasks)."""

    version = models.BigIntegerField(default=0)

    def __str__(self) -> str:
        return f"version {self.version}"
