"""The built-in discovery types: ``file`` and ``dns``.

A pool's ``[pools.NAME.discovery]`` table names one; its backends join the
pool's static ``backends`` (see :mod:`balancekit.discovery._runner` for how
an answer is applied, and ``docs/discovery.md``).
"""

from __future__ import annotations

from typing import Any

from .._exceptions import DiscoveryError
from ..hookspecs import hookimpl
from .dns import DNSDiscovery
from .file import FileDiscovery

__all__ = ["DNSDiscovery", "DiscoveryError", "FileDiscovery"]


@hookimpl(trylast=True)
def balancekit_register_discovery() -> list[type[Any]]:
    return [FileDiscovery, DNSDiscovery]
