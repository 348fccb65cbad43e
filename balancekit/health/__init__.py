"""The built-in active health checks: ``http``, ``tcp`` and ``none``."""

from __future__ import annotations

from typing import Any

from ..hookspecs import hookimpl
from .http import HTTPHealthCheck
from .none import NoHealthCheck
from .tcp import TCPHealthCheck

__all__ = ["HTTPHealthCheck", "NoHealthCheck", "TCPHealthCheck"]


@hookimpl(trylast=True)
def balancekit_register_health_checks() -> list[type[Any]]:
    return [HTTPHealthCheck, TCPHealthCheck, NoHealthCheck]
