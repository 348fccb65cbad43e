"""Runtime changes to a pool, as one process tells the others.

A change made through a pool's methods (``drain``, ``add_backend``, an
ejection, a health verdict, a failure in a streak) is a :class:`Change`;
the pool hands it to its ``on_change`` listener (the coordinator, with a
shared store), which publishes it as JSON; every other process turns the
JSON back into a ``Change`` and gives it to its own pool's ``apply``.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._backend import Backend


class Op(enum.StrEnum):
    ADD = "add"
    REMOVE = "remove"
    DRAIN = "drain"
    DISABLE = "disable"
    ENABLE = "enable"
    WEIGHT = "weight"
    #: Out for ``seconds``, ejected by another process.
    EJECT = "eject"
    #: An active check's verdict, ``healthy``.
    HEALTH = "health"
    #: One failure, and the success that ends a streak: counted in the
    #: store across processes, never applied as such.
    FAILURE = "failure"
    RECOVERED = "recovered"


#: What an operator changes: also kept in the store's shared hash.
ADMIN_OPS = frozenset({Op.ADD, Op.REMOVE, Op.DRAIN, Op.DISABLE, Op.ENABLE, Op.WEIGHT})
COUNTING_OPS = frozenset({Op.FAILURE, Op.RECOVERED})

#: The fields each operation carries beyond ``op`` and ``url``.
_FIELDS: dict[Op, tuple[str, ...]] = {
    Op.ADD: ("weight", "backup"),
    Op.WEIGHT: ("weight",),
    Op.EJECT: ("seconds",),
    Op.HEALTH: ("healthy",),
}
_TYPES = {"weight": int, "backup": bool, "seconds": float, "healthy": bool}


@dataclass(frozen=True, slots=True)
class Change:
    """One runtime change to the backend ``url`` of a pool."""

    op: Op
    url: str
    weight: int = 1
    backup: bool = False
    seconds: float = 0.0
    healthy: bool = True

    def to_json(self) -> dict[str, Any]:
        """The change as a JSON object: ``op``, ``url`` and its own fields."""
        data: dict[str, Any] = {"op": self.op.value, "url": self.url}
        for name in _FIELDS.get(self.op, ()):
            data[name] = getattr(self, name)
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Change:
        """The change a JSON object describes; ValueError if it is not one."""
        raw_op, url = data.get("op"), data.get("url")
        if not isinstance(url, str) or not isinstance(raw_op, str):
            raise ValueError(f"not a change: {dict(data)!r}")
        op = Op(raw_op)  # ValueError for an unknown one
        fields: dict[str, Any] = {}
        for name in _FIELDS.get(op, ()):
            value = data.get(name)
            kind = _TYPES[name]
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise ValueError(f"change {op!r}: {name} must be {kind.__name__}, got {value!r}")
            fields[name] = value
        return cls(op, url, **fields)


def toward_flags(backend: Backend, *, enabled: bool, draining: bool) -> list[Change]:
    """The changes that bring ``backend`` to an operator's ``enabled`` and
    ``draining`` flags, as a shared store or a database keeps them (a
    disabled backend asked to drain is enabled first: ``drain`` alone keeps
    a disabled backend disabled)."""
    url = backend.url
    if not enabled:
        return [Change(Op.DISABLE, url)]
    if not draining:
        return [Change(Op.ENABLE, url)]
    enable = [] if backend.enabled else [Change(Op.ENABLE, url)]
    return [*enable, Change(Op.DRAIN, url)]
