from __future__ import annotations

from django.contrib import admin
from django.http import HttpRequest, HttpResponse
from django.urls import path


def home(request: HttpRequest) -> HttpResponse:
    return HttpResponse("django view")


urlpatterns = [path("", home), path("view/", home), path("admin/", admin.site.urls)]
