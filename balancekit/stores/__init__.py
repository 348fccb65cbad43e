"""The built-in stores, chosen by URL scheme: ``memory://`` (default)."""

from __future__ import annotations

from typing import Any

from ..hookspecs import hookimpl
from .memory import MemoryStore

__all__ = ["MemoryStore"]


@hookimpl(trylast=True)
def balancekit_register_stores() -> list[type[Any]]:
    return [MemoryStore]
