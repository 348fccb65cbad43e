"""The built-in load-balancing algorithms, one module per config name."""

from __future__ import annotations

from typing import Any

from ..hookspecs import hookimpl
from .base import Algorithm
from .consistent_hash import ConsistentHash
from .first import First
from .least_connections import LeastConnections
from .least_response_time import LeastResponseTime
from .maglev import Maglev
from .p2c import PowerOfTwoChoices
from .prequal import Prequal
from .random import Random
from .round_robin import RoundRobin
from .weighted_random import WeightedRandom
from .weighted_round_robin import WeightedRoundRobin

__all__ = [
    "Algorithm",
    "ConsistentHash",
    "First",
    "LeastConnections",
    "LeastResponseTime",
    "Maglev",
    "PowerOfTwoChoices",
    "Prequal",
    "Random",
    "RoundRobin",
    "WeightedRandom",
    "WeightedRoundRobin",
]


@hookimpl(trylast=True)
def balancekit_register_algorithms() -> list[type[Any]]:
    return [
        RoundRobin,
        Random,
        WeightedRoundRobin,
        WeightedRandom,
        LeastConnections,
        LeastResponseTime,
        PowerOfTwoChoices,
        Prequal,
        ConsistentHash,
        Maglev,
        First,
    ]
