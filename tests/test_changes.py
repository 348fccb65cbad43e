"""balancekit._changes: the runtime changes processes send each other."""

from __future__ import annotations

import json

import pytest

from balancekit import Balancer
from balancekit._changes import Change, Op, toward_flags

URL = "http://127.0.0.1:9001"


@pytest.mark.parametrize(
    "change",
    [
        Change(Op.ADD, URL, weight=3, backup=True),
        Change(Op.REMOVE, URL),
        Change(Op.WEIGHT, URL, weight=7),
        Change(Op.EJECT, URL, seconds=12.5),
        Change(Op.HEALTH, URL, healthy=False),
        Change(Op.FAILURE, URL),
    ],
    ids=lambda change: change.op.value,
)
def test_a_change_survives_json(change: Change) -> None:
    assert Change.from_json(json.loads(json.dumps(change.to_json()))) == change


def test_json_carries_only_the_fields_of_its_operation() -> None:
    assert Change(Op.DRAIN, URL, weight=5).to_json() == {"op": "drain", "url": URL}
    assert Change(Op.EJECT, URL, seconds=3).to_json() == {"op": "eject", "url": URL, "seconds": 3}


@pytest.mark.parametrize(
    "data",
    [
        {"op": "explode", "url": URL},
        {"op": "drain"},
        {"url": URL},
        {"op": "weight", "url": URL, "weight": "3"},
        {"op": "weight", "url": URL, "weight": True},
        {"op": "add", "url": URL, "weight": 1},
        {"op": "eject", "url": URL, "seconds": None},
    ],
)
def test_what_is_not_a_change_is_a_value_error(data: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        Change.from_json(data)


def test_apply_is_idempotent_and_skips_unknown_backends() -> None:
    balancer = Balancer({"pools": {"api": {"backends": [URL]}}})
    pool = balancer.pools["api"]
    changes: list[Change] = []
    pool.on_change = lambda _pool, change: changes.append(change)
    for _ in range(2):
        pool.apply(Change(Op.DRAIN, URL))
        pool.apply(Change(Op.WEIGHT, URL, weight=4))
        pool.apply(Change(Op.ADD, "http://127.0.0.1:9002", weight=2))
        pool.apply(Change(Op.REMOVE, "http://127.0.0.1:9003"))
    assert [(b.url, b.weight, b.draining) for b in pool.backends] == [
        (URL, 4, True),
        ("http://127.0.0.1:9002", 2, False),
    ]
    assert changes == [], "an applied change is never announced again"
    pool.drain("http://127.0.0.1:9002")
    assert changes == [Change(Op.DRAIN, "http://127.0.0.1:9002")]


@pytest.mark.parametrize(
    ("start", "flags", "ends"),
    [
        ("enabled", {"enabled": False, "draining": False}, "disabled"),
        ("enabled", {"enabled": True, "draining": True}, "draining"),
        ("disabled", {"enabled": True, "draining": True}, "draining"),
        ("draining", {"enabled": True, "draining": False}, "healthy"),
        ("disabled", {"enabled": True, "draining": False}, "healthy"),
    ],
)
def test_toward_flags_brings_a_backend_to_an_operators_flags(
    start: str, flags: dict[str, bool], ends: str
) -> None:
    balancer = Balancer({"pools": {"api": {"backends": [URL]}}})
    pool = balancer.pools["api"]
    if start == "disabled":
        pool.disable(URL)
    elif start == "draining":
        pool.drain(URL)
    backend = pool.backends[0]
    for change in toward_flags(backend, **flags):
        pool.apply(change)
    assert backend.state.value == ends
    assert backend.enabled is flags["enabled"]
    if flags["enabled"]:  # a disabled backend keeps whatever draining said before
        assert backend.draining is flags["draining"]
