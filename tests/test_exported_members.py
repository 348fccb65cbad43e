from __future__ import annotations
import __future__

import inspect

import balancekit
import balancekit.asgi
from tests.helpers import app_fallback, wsgi_fallback


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


def test_load_report_all_lists_exactly_its_public_names() -> None:
    import balancekit.load_report as module

    public = {  # what it defines (its imports have another __module__), not its imports
        name
        for name, value in vars(module).items()
        if not name.startswith("_")
        and getattr(value, "__module__", module.__name__) == module.__name__
        and not inspect.ismodule(value)
    }
    assert set(module.__all__) == public
    assert module.__all__ == sorted(module.__all__)
    assert "LoadReportMiddleware" in module.__all__


def test_contract_names() -> None:
    for name in ("Balancer", "ConfigError", "hookimpl", "Algorithm", "Backend", "__version__"):
        assert name in balancekit.__all__
        assert getattr(balancekit, name) is not None
    assert balancekit.__version__.count(".") >= 1


def test_the_contract_middlewares_are_the_asgi_and_wsgi_kinds() -> None:
    import balancekit.wsgi

    config = {"pools": {"api": {"backends": ["http://127.0.0.1:9"]}}}
    asgi = balancekit.asgi.BalanceMiddleware(app_fallback, config=config)
    wsgi = balancekit.wsgi.BalanceMiddleware(wsgi_fallback, config=config)
    assert inspect.iscoroutinefunction(asgi.__call__)
    assert not inspect.iscoroutinefunction(wsgi.__call__)
    assert list(asgi.balancer.pools) == list(wsgi.balancer.pools) == ["api"]
