"""Plugins: built-ins through the hooks, entry points loaded one by one."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from balancekit import Balancer, PluginError, RequestInfo, hookimpl
from balancekit._plugins import make_plugin_manager

GOOD = """
from balancekit import hookimpl


class Reverse:
    name = "reverse"

    def pick(self, backends, request):
        return backends[-1]


class MyRoundRobin:
    name = "round_robin"

    def pick(self, backends, request):
        return backends[0]


@hookimpl
def balancekit_register_algorithms():
    return [Reverse, MyRoundRobin]
"""


@pytest.fixture
def installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A real distribution on sys.path with one good and one broken plugin."""
    (tmp_path / "bk_good_plugin.py").write_text(GOOD)
    (tmp_path / "bk_broken_plugin.py").write_text("raise ImportError('boom: missing dependency')\n")
    info = tmp_path / "bk_test_plugins-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: bk-test-plugins\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[balancekit]\ngood = bk_good_plugin\nbroken = bk_broken_plugin\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in ("bk_good_plugin", "bk_broken_plugin"):
        sys.modules.pop(name, None)


def test_builtins_are_registered_through_the_hooks() -> None:
    manager = make_plugin_manager(entry_points=False)
    assert set(manager.classes("algorithm")) == {
        "round_robin",
        "random",
        "weighted_round_robin",
        "weighted_random",
        "least_connections",
        "least_response_time",
        "p2c",
        "prequal",
        "consistent_hash",
        "maglev",
        "first",
    }
    assert set(manager.classes("health check")) == {"http", "tcp", "none"}
    assert set(manager.classes("store")) == {"memory", "redis", "rediss"}
    assert set(manager.classes("persistence")) == {"cookie", "session"}
    assert set(manager.classes("discovery")) == {"file", "dns"}
    assert {dist for _, dist in manager.classes("algorithm").values()} == {"balancekit"}


def test_a_broken_plugin_is_reported_and_the_others_still_load(
    installed: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="balancekit"):
        manager = make_plugin_manager()
    assert [(name, str(error)) for name, error in manager.failed] == [
        ("broken", "boom: missing dependency")
    ]
    assert "'broken' failed to load" in caplog.text
    algorithms = manager.classes("algorithm")
    assert algorithms["reverse"][1] == "bk-test-plugins 1.0"
    # a third party may replace a built-in of the same name, and it is logged
    assert algorithms["round_robin"][1] == "bk-test-plugins 1.0"
    assert "replaces the built-in" in caplog.text


def test_a_plugin_algorithm_serves_a_pool(installed: Path) -> None:
    balancer = Balancer(
        {"pools": {"api": {"backends": ["http://a:1", "http://b:2"], "algorithm": "reverse"}}}
    )
    pool = balancer.pools["api"]
    assert pool.acquire(RequestInfo("GET", "/")).url == "http://b:2"


def test_two_plugins_with_one_name_are_an_error() -> None:
    class One:
        name = "same"

        def pick(self, backends, request):
            return backends[0]

    class Plugin:
        def __init__(self, cls):
            self.cls = cls

        @hookimpl
        def balancekit_register_algorithms(self):
            return [self.cls]

    manager = make_plugin_manager(entry_points=False)
    manager.pm.register(Plugin(One), name="first")
    manager.pm.register(Plugin(One), name="second")
    with pytest.raises(PluginError, match="'same' is registered twice"):
        manager.classes("algorithm")


def test_a_class_without_a_name_is_an_error() -> None:
    class Nameless:
        def pick(self, backends, request):
            return backends[0]

    class Plugin:
        @hookimpl
        def balancekit_register_algorithms(self):
            return [Nameless]

    manager = make_plugin_manager(entry_points=False)
    manager.pm.register(Plugin(), name="nameless")
    with pytest.raises(PluginError, match="without a 'name'"):
        manager.classes("algorithm")


def test_plugins_command_lists_third_party_and_failures(installed: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(installed)}
    result = subprocess.run(
        [sys.executable, "-m", "balancekit", "plugins"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any(line.split() == ["algorithm", "reverse", "bk-test-plugins", "1.0"] for line in lines)
    assert "plugin 'broken' failed to load: ImportError: boom" in result.stderr


def test_every_hook_is_documented() -> None:
    from balancekit import hookspecs

    docs = (Path(__file__).parent.parent / "docs" / "plugins.md").read_text()
    hooks = [name for name in vars(hookspecs) if name.startswith("balancekit_")]
    assert len(hooks) == 6
    for hook in hooks:
        assert f"`{hook}" in docs, f"{hook} is missing from docs/plugins.md"


def test_hookspec_docstrings() -> None:
    from balancekit import hookspecs

    for name, func in vars(hookspecs).items():
        if name.startswith("balancekit_"):
            assert textwrap.dedent(func.__doc__ or "").strip(), name
