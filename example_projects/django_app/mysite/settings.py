"""Settings of the example project: balancekit first in MIDDLEWARE.

``DATABASE_URL``-free on purpose: SQLite by default, PostgreSQL when
``BALANCEKIT_EXAMPLE_PG`` names a database on 127.0.0.1 (trust auth), as
the tests do.
"""

from __future__ import annotations

import os
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
SECRET_KEY = os.environ.get("SECRET_KEY", "example-only-not-secret")
DEBUG = os.environ.get("DEBUG", "1") == "1"
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "balancekit_django",
]

MIDDLEWARE = [
    "balancekit_django.middleware.BalanceMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]

ROOT_URLCONF = "mysite.urls"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]
WSGI_APPLICATION = "mysite.wsgi.application"

if os.environ.get("BALANCEKIT_EXAMPLE_PG"):
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": os.environ["BALANCEKIT_EXAMPLE_PG"],
            "HOST": "127.0.0.1",
            "USER": os.environ.get("PGUSER", "postgres"),
        }
    }
else:
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": os.environ.get("BALANCEKIT_EXAMPLE_SQLITE", str(BASE_DIR / "db.sqlite3")),
        }
    }

STATIC_URL = "static/"
USE_TZ = True

# Pools here are served beside the ones managed in the admin. The tests point
# this at their own backends through BALANCEKIT_CONFIG (a TOML path).
BALANCEKIT = os.environ.get("BALANCEKIT_CONFIG") or {
    "pools": {"static": {"backends": ["http://127.0.0.1:9001"]}},
    "routes": [{"prefix": "/static-pool/", "pool": "static"}],
}
# How often each worker looks for changes made in the admin.
BALANCEKIT_POLL_INTERVAL = float(os.environ.get("BALANCEKIT_POLL_INTERVAL", "2"))
