"""Slow start: a backend that joins (or comes back) takes a growing share
of its weight, as Envoy's slow start mode does.

It begins at ``RAMP_FLOOR`` of its weight (Envoy's default
min_weight_percent) and grows linearly to all of it over the pool's
``slow_start`` seconds, in ``RAMP_STEPS`` steps: each step is one rebuild
of the pool's tables, so a ramp costs ten rebuilds, nothing per request.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._backend import Backend

#: A joining backend's first share of its weight, and the steps to all of it.
RAMP_FLOOR = 0.1
RAMP_STEPS = 10

NEVER = float("inf")


class SlowStart:
    """The ramps of one pool. Not thread-safe: the pool's lock guards it."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.ramping: list[Backend] = []
        #: When the next step is due (``NEVER`` when nothing ramps).
        self.next_step = NEVER

    def start(self, joined: Iterable[Backend], now: float) -> None:
        for backend in joined:
            backend.ramp_started = now
            backend.effective_weight = backend.weight * RAMP_FLOOR
            if backend not in self.ramping:
                self.ramping.append(backend)
        self.next_step = min(self.next_step, now + self.seconds / RAMP_STEPS)

    def advance(self, now: float) -> None:
        """Move every ramp to its share at ``now``; ended ramps leave."""
        still = []
        for backend in self.ramping:
            if backend.removed:
                continue
            share = (now - backend.ramp_started) / self.seconds
            if share >= 1:
                backend.effective_weight = backend.weight
                backend.ramp_started = 0.0
            else:
                backend.effective_weight = backend.weight * max(RAMP_FLOOR, share)
                still.append(backend)
        self.ramping = still
        self.next_step = NEVER
        if still:
            # The next step, or the end of a ramp if one ends sooner.
            ends = min(b.ramp_started for b in still) + self.seconds
            self.next_step = min(now + self.seconds / RAMP_STEPS, ends)
