"""The plugin manager: built-ins first, then the ``balancekit`` entry points."""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pluggy

from . import hookspecs
from ._config import plugin_options
from ._exceptions import ConfigError, PluginError, Problem

logger = logging.getLogger("balancekit")

DEFAULT_PLUGINS = (
    "balancekit.algorithms",
    "balancekit.health",
    "balancekit.persistence",
    "balancekit.stores",
    "balancekit.discovery",
)

#: The hook that lists each kind of plugin class, by the kind's name.
KIND_HOOKS = {
    "algorithm": "balancekit_register_algorithms",
    "health check": "balancekit_register_health_checks",
    "persistence": "balancekit_register_persistence",
    "store": "balancekit_register_stores",
    "discovery": "balancekit_register_discovery",
}


@dataclass
class PluginManager:
    """A pluggy manager plus what entry-point loading found.

    ``failed`` holds ``(entry point name, error)`` for every plugin that
    could not be loaded; ``distributions`` maps a registered plugin's name
    to the distribution that ships it.
    """

    pm: pluggy.PluginManager
    failed: list[tuple[str, BaseException]] = field(default_factory=list)
    distributions: dict[str, str] = field(default_factory=dict)

    def classes(self, kind: str) -> dict[str, tuple[type[Any], str]]:
        """Every class of one kind by its ``name``, with its distribution.

        Built-ins are ``trylast`` hook implementations, seen first here: a
        third-party class with a built-in's name replaces it (and says so in
        the log). Two third-party classes with one name are a
        :class:`PluginError`.
        """
        hook = getattr(self.pm.hook, KIND_HOOKS[kind])
        found: dict[str, tuple[type[Any], str]] = {}
        for impl in hook.get_hookimpls():
            plugin_name = self.pm.get_name(impl.plugin) or "?"
            for cls in impl.function() or []:
                name = getattr(cls, "name", None)
                if not isinstance(name, str) or not name:
                    raise PluginError(
                        f"plugin {plugin_name!r} registered {kind} {cls!r} without a 'name' string"
                    )
                if name in found and found[name][1] == "balancekit":
                    logger.warning(
                        "%s %r of %r replaces the built-in one",
                        kind,
                        name,
                        self.distribution(plugin_name),
                    )
                elif name in found:
                    raise PluginError(
                        f"{kind} {name!r} is registered twice: by"
                        f" {found[name][1]!r} and by {self.distribution(plugin_name)!r}"
                    )
                found[name] = (cls, self.distribution(plugin_name))
        return found

    def distribution(self, plugin_name: str) -> str:
        return self.distributions.get(plugin_name, plugin_name)


def make_plugin_manager(*, entry_points: bool = True) -> PluginManager:
    """A fresh manager with the built-ins and, unless told not to, every
    installed ``balancekit`` entry point."""
    pm = pluggy.PluginManager("balancekit")
    pm.add_hookspecs(hookspecs)
    manager = PluginManager(pm)
    for name in DEFAULT_PLUGINS:
        pm.register(importlib.import_module(name), name=name)
        manager.distributions[name] = "balancekit"
    if entry_points:
        _load_entry_points(manager)
    return manager


def _load_entry_points(manager: PluginManager) -> None:
    # Unlike PluginManager.load_setuptools_entrypoints, one broken plugin
    # must not stop the others from loading (CONTRACT section 8).
    pm = manager.pm
    for ep in importlib.metadata.entry_points(group="balancekit"):
        if pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
            continue
        try:
            pm.register(ep.load(), name=ep.name)
        except Exception as exc:  # a plugin's own bug: report it, keep loading the rest
            logger.error(
                "balancekit plugin %r failed to load: %s: %s", ep.name, type(exc).__name__, exc
            )
            manager.failed.append((ep.name, exc))
            continue
        dist = ep.dist
        manager.distributions[ep.name] = f"{dist.name} {dist.version}" if dist else ep.name


def build_plugin(cls: type[Any], options: Mapping[str, Any], path: str, **seams: Any) -> Any:
    """An instance of the plugin class ``cls`` with a configuration table's
    ``options``, ``path`` being that table's key path.

    ``seams`` are what the caller lends a plugin that asks for one by name
    in its constructor (``clock``, ``rng``; to persistence types ``pool``,
    ``secrets`` and ``store``); a plugin that does not ask gets none. An
    unknown or missing option, or a ``TypeError``/``ValueError`` from the
    constructor, is a :class:`ConfigError`; a constructor message of the
    form ``"option: what is wrong"`` names the option in the key path (one
    of its parameters: a key left out that the others make necessary).
    """
    problems = plugin_options(path, cls, options)
    if problems:
        raise ConfigError(problems)
    parameters = inspect.signature(cls).parameters
    lent = {name: value for name, value in seams.items() if name in parameters}
    try:
        return cls(**options, **lent)
    except (TypeError, ValueError) as exc:
        key, sep, rest = str(exc).partition(": ")
        if sep and (key in options or key in parameters):
            raise ConfigError([Problem(f"{path}.{key}", rest)]) from None
        raise ConfigError([Problem(path, str(exc))]) from None
