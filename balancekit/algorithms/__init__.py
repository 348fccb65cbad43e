"""The built-in load-balancing algorithms, one module per config name."""

from __future__ import annotations

from typing import Any

from ..hookspecs import hookimpl
from .base import Algorithm
from .random import Random
from .round_robin import RoundRobin
from .weighted_round_robin import WeightedRoundRobin

__all__ = ["Algorithm", "Random", "RoundRobin", "WeightedRoundRobin"]


@hookimpl(trylast=True)
def balancekit_register_algorithms() -> list[type[Any]]:
    return [RoundRobin, Random, WeightedRoundRobin]
