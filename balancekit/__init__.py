"""balancekit: spread HTTP requests over pools of upstream servers."""

from __future__ import annotations

from ._backend import Backend, BackendState
from ._balancer import Balancer
from ._config import BalancerConfig, load_config
from ._exceptions import (
    BalancekitError,
    ConfigError,
    NoEligibleBackend,
    PluginError,
    ProxyError,
    StoreError,
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from ._pool import Pool
from ._request import RequestInfo
from .algorithms import Algorithm
from .hookspecs import hookimpl

__all__ = [
    "Algorithm",
    "Backend",
    "BackendState",
    "BalancekitError",
    "Balancer",
    "BalancerConfig",
    "ConfigError",
    "NoEligibleBackend",
    "PluginError",
    "Pool",
    "ProxyError",
    "RequestInfo",
    "StoreError",
    "UpstreamConnectError",
    "UpstreamError",
    "UpstreamProtocolError",
    "UpstreamTimeout",
    "__version__",
    "hookimpl",
    "load_config",
]


def __getattr__(name: str) -> str:
    if name == "__version__":
        from importlib.metadata import version

        return version("balancekit")
    raise AttributeError(f"module {__name__} has no attribute {name!r}")
