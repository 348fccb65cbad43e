"""Pools, backends and routes kept in the database and managed in the admin."""

from __future__ import annotations

import re
from contextlib import suppress
from typing import Any

from django.core.exceptions import NON_FIELD_ERRORS, ValidationError
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
    """A route as in ``[[routes]]`` (CONTRACT section 10): a prefix and
    optional host, method and header conditions, sent to ``pool`` or
    split over pools by name (which may be settings' pools too)."""

    prefix = models.CharField(max_length=500)
    host = models.CharField(
        max_length=255, blank=True, help_text='e.g. "api.example.com" or "*.example.com".'
    )
    methods = models.JSONField(
        null=True, blank=True, help_text='e.g. ["GET", "HEAD"]; empty: every method.'
    )
    headers = models.JSONField(
        null=True,
        blank=True,
        help_text='Each header present with this value ("*": present), e.g. {"X-Canary": "1"}.',
    )
    pool = models.ForeignKey(
        Pool, on_delete=models.CASCADE, related_name="routes", null=True, blank=True
    )
    split = models.JSONField(
        null=True,
        blank=True,
        help_text='Instead of pool: percentages by pool name, e.g. {"api": 90, "api_next": 10}.',
    )
    split_key = models.CharField(
        max_length=200,
        blank=True,
        help_text="Keeps a key on one side of the split: ip, header:NAME, cookie:NAME or "
        "query:NAME.",
    )
    strip_prefix = models.BooleanField(default=False)
    rewrite = models.CharField(
        max_length=500, blank=True, help_text="Replaces the prefix upstream, e.g. /v2/."
    )
    timeouts = models.JSONField(
        null=True, blank=True, help_text='Overrides the pool\'s for this route, e.g. {"read": 5}.'
    )
    retries = models.JSONField(
        null=True,
        blank=True,
        help_text='Overrides the pool\'s for this route, e.g. {"attempts": 1}.',
    )

    objects = VersionedQuerySet.as_manager()

    class Meta:
        # Among equals the first in the configuration wins: keep it stable.
        ordering = ["prefix", "id"]

    def __str__(self) -> str:
        target = self.pool.name if self.pool is not None else f"split {self.split}"
        return f"{self.host}{self.prefix} -> {target}"

    def as_config(self) -> dict[str, Any]:
        """The route as a ``[[routes]]`` table, with only the keys that are set."""
        config: dict[str, Any] = {"prefix": self.prefix, "strip_prefix": self.strip_prefix}
        pool = self.pool
        if pool is not None:
            config["pool"] = pool.name
        for key in ("host", "split_key", "rewrite"):
            if getattr(self, key):
                config[key] = getattr(self, key)
        for key in ("methods", "headers", "split", "timeouts", "retries"):
            if getattr(self, key) is not None:
                config[key] = getattr(self, key)
        return config

    def clean(self) -> None:
        # The core's own rules, on a configuration of this route and the
        # pools it names; each problem lands on the field it is about.
        route = self.as_config()
        try:
            load_config({"pools": dict.fromkeys(_known_pools(route), {}), "routes": [route]})
        except ConfigError as exc:
            raise _route_errors(exc) from None


def _known_pools(route: dict[str, Any]) -> list[str]:
    """The pools ``route`` names that exist: its own, and those of its
    split found in the database or in ``settings.BALANCEKIT``."""
    names = [route["pool"]] if "pool" in route else []
    split = route.get("split")
    if isinstance(split, dict) and split:
        from .runtime import settings_config

        names += Pool.objects.filter(name__in=list(split)).values_list("name", flat=True)
        with suppress(ConfigError):  # a BALANCEKIT that cannot be read: checks say so
            names += [name for name in settings_config().get("pools", {}) if name in split]
    return names


#: The model's fields that a ``routes[0].<key>`` problem may be about.
_ROUTE_FIELDS = frozenset(
    {
        "prefix",
        "host",
        "methods",
        "headers",
        "pool",
        "split",
        "split_key",
        "strip_prefix",
        "rewrite",
        "timeouts",
        "retries",
    }
)


def _route_errors(error: ConfigError) -> ValidationError:
    """A ConfigError about ``routes[0]`` as errors on the fields concerned
    (``routes[0].split: ...`` on ``split``), the rest on the whole route."""
    by_field: dict[str, list[str]] = {}
    for problem in error.problems:
        rest = problem.path.removeprefix("routes[0]").removeprefix(".")
        key = re.split(r"[.\[]", rest, maxsplit=1)[0]
        field = key if key in _ROUTE_FIELDS else NON_FIELD_ERRORS
        message = problem.message if rest in (key, "") else f"{rest}: {problem.message}"
        by_field.setdefault(field, []).append(message)
    return ValidationError(by_field)


class State(models.Model):
    """One row: a counter bumped with every change of the tables above,
    which each worker polls (as django-celery-beat's PeriodicTasks)."""

    version = models.BigIntegerField(default=0)

    def __str__(self) -> str:
        return f"version {self.version}"
