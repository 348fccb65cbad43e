"""Outlier ejection: a backend that fails ``consecutive_failures`` times in
a row is taken out for a while, as Envoy's consecutive-5xx detection does.

The ejection time doubles with each ejection of the same backend, from
``base_ejection_time`` up to ``max_ejection_time``; at most
``max_ejection_percent`` of a pool's backends are out at once. The pool
calls these under its lock and rebuilds its tables after.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._backend import Backend
    from ._config import OutlierDetectionConfig


def eject(
    config: OutlierDetectionConfig, backend: Backend, backends: list[Backend], now: float
) -> float | None:
    """Eject ``backend`` if its failure streak calls for it and the pool's
    cap allows: the ejection's length in seconds, or None."""
    if backend.ejected_until or backend.removed:
        return None
    if backend.consecutive_failures < config.consecutive_failures:
        return None
    ejected = sum(1 for b in backends if b.ejected_until)
    if (ejected + 1) * 100 > config.max_ejection_percent * len(backends):
        return None
    backend.ejections += 1
    duration = float(
        min(config.base_ejection_time * 2 ** (backend.ejections - 1), config.max_ejection_time)
    )
    backend.ejected_until = now + duration
    backend.consecutive_failures = 0
    return duration


def eject_for(backend: Backend, seconds: float, now: float) -> bool:
    """Eject ``backend`` for what is left of another process's ejection;
    whether that keeps it out longer than it already is."""
    until = now + seconds
    if seconds <= 0 or backend.removed or backend.ejected_until >= until:
        return False
    backend.ejected_until = until
    return True


def expire(backends: list[Backend], now: float) -> list[Backend]:
    """Bring back the backends whose ejection is over; they are returned."""
    back = [b for b in backends if b.ejected_until and b.ejected_until <= now]
    for backend in back:
        backend.ejected_until = 0.0
    return back
