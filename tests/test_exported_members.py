from __future__ import annotations
import __future__

import inspect

import balancekit
import balancekit.asgi


def test_all_lists_exactly_the_public_names() -> None:
    public = {
        name
        for name, value in vars(balancekit).items()
        if not name.startswith("_")
        and not inspect.ismodule(value)
        and not isinstance(value, __future__._Feature)
    }
    assert set(balancekit.__all__) == public | {"__version__"}
    assert balancekit.__all__ == sorted(balancekit.__all__)


def test_contract_names() -> None:
    for name in ("Balancer", "ConfigError", "hookimpl", "Algorithm", "Backend", "__version__"):
        assert name in balancekit.__all__
        assert getattr(balancekit, name) is not None
    assert balancekit.asgi.BalanceMiddleware.__name__ == "BalanceMiddleware"
    assert balancekit.__version__.count(".") >= 1
