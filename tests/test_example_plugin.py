"""The example third-party plugin package, installed as a user would install it."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from importlib import metadata
from pathlib import Path

import balancekit_canary
import httpx
import pytest

from balancekit import Balancer, ConfigError
from balancekit.asgi import BalanceMiddleware
from tests.helpers import app_fallback

PACKAGE = Path(__file__).resolve().parent.parent / "example_projects" / "canary_plugin"


def test_balancekit_plugins_lists_it_with_its_distribution() -> None:
    command = Path(sys.executable).with_name("balancekit")  # the script pip installed
    out = subprocess.run(
        [str(command), "plugins"], capture_output=True, text=True, check=True
    ).stdout
    line = next(line for line in out.splitlines() if "header_canary" in line)
    assert line.split()[:3] == ["algorithm", "header_canary", "balancekit-canary"]


def test_canary_traffic_through_the_real_proxy(serve, upstreams) -> None:
    a, b, c = upstreams
    config = {
        "pools": {
            "api": {
                "backends": [a.url, b.url, c.url],
                "algorithm": {"name": "header_canary", "canaries": [c.url], "percent": 25},
            }
        },
        "routes": [{"prefix": "/api", "pool": "api"}],
    }
    proxy = serve(BalanceMiddleware(app_fallback, config=config))
    with httpx.Client(base_url=proxy.url) as client:
        opted = {
            client.get("/api/x", headers={"X-Canary": "1"}).json()["backend"] for _ in range(4)
        }
        spread = Counter(client.get("/api/x").json()["backend"] for _ in range(40))
    assert opted == {"c"}
    assert spread == {"a": 15, "b": 15, "c": 10}  # a quarter to the canary, evenly


def test_its_bad_options_fail_at_start_up_with_the_key_path() -> None:
    config = {
        "pools": {
            "api": {"algorithm": {"name": "header_canary", "canaries": ["x"], "percent": 150}}
        }
    }
    with pytest.raises(
        ConfigError, match=r"pools\.api\.algorithm\.percent: must be a number between 0 and 100"
    ):
        Balancer(config)


def test_it_is_installed_from_this_repository_with_its_entry_point() -> None:
    distribution = metadata.distribution("balancekit-canary")
    (entry_point,) = (e for e in distribution.entry_points if e.group == "balancekit")
    assert (entry_point.name, entry_point.value) == ("canary", "balancekit_canary")
    # Editable, from example_projects: the tests run the code in this tree.
    assert Path(balancekit_canary.__file__).is_relative_to(PACKAGE)


def test_canary_down_sends_opted_in_requests_to_the_stable_backends(serve, upstreams) -> None:
    a, b, c = upstreams
    config = {
        "pools": {
            "api": {
                "backends": [a.url, b.url, c.url + "/"],
                # written without the slash: still the same backend
                "algorithm": {"name": "header_canary", "canaries": [c.url]},
            }
        },
        "routes": [{"prefix": "/api", "pool": "api"}],
    }
    balancer = Balancer(config)
    proxy = serve(BalanceMiddleware(app_fallback, balancer=balancer))
    pool = balancer.pools["api"]

    def opted_in() -> set[str]:
        with httpx.Client(base_url=proxy.url, headers={"X-Canary": "true"}) as client:
            return {client.get("/api/x").json()["backend"] for _ in range(4)}

    assert opted_in() == {"c"}
    pool.disable(c.url + "/")
    assert opted_in() == {"a", "b"}
    pool.enable(c.url + "/")
    assert opted_in() == {"c"}
