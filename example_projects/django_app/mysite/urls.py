from __future__ import annotations

import os

from django.contrib import admin
from django.http import HttpRequest, JsonResponse
from django.urls import path


def home(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"app": "django example", "admin": "/admin/"})


def worker(request: HttpRequest) -> JsonResponse:
    """Which worker answered, and its pools: each worker reloads on its own."""
    from balancekit_django.runtime import current

    runtime = current()
    return JsonResponse(
        {"pid": os.getpid(), "version": runtime.version, "status": runtime.balancer.status()}
    )


urlpatterns = [
    path("", home),
    path("worker/", worker),
    path("admin/", admin.site.urls),
]
