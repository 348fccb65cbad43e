"""The plugin API of balancekit: every hook a plugin may implement.

A plugin is a module or object with functions decorated by
:data:`hookimpl`, registered through the ``balancekit`` entry-point group.
balancekit's own algorithms, health checks, persistence types and stores
are registered through these same hooks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from ._backend import Backend, BackendState
    from ._pool import Pool

hookspec = pluggy.HookspecMarker("balancekit")
hookimpl = pluggy.HookimplMarker("balancekit")


@hookspec
def balancekit_register_algorithms() -> list[type[Any]]:  # type: ignore[empty-body]
    """Return algorithm classes; each is selectable by its ``name``.

    An algorithm class has a ``name`` string, a constructor that takes the
    algorithm table's other keys as keyword arguments, and
    ``pick(self, backends, request)`` returning one of ``backends``::

        class Reverse:
            name = "reverse"

            def pick(self, backends, request):
                return backends[-1]

    Called once each time a :class:`~balancekit.Balancer` is built. Two
    classes with the same name are a ``PluginError`` naming both.
    """


@hookspec
def balancekit_register_health_checks() -> list[type[Any]]:  # type: ignore[empty-body]
    """Return active health check classes, selectable by ``name`` as
    ``[pools.NAME.health_check] type``.

    A check class takes its table's own keys (everything but ``type``,
    ``interval``, ``rise`` and ``fall``) as keyword arguments and has
    ``async def check(self, backend) -> bool``.
    """


@hookspec
def balancekit_register_persistence() -> list[type[Any]]:  # type: ignore[empty-body]
    """Return session persistence classes, selectable by ``name`` as
    ``[pools.NAME.persistence] type``."""


@hookspec
def balancekit_register_stores() -> list[type[Any]]:  # type: ignore[empty-body]
    """Return store classes; ``name`` is the URL scheme they serve
    (``memory`` for ``memory://``)."""


@hookspec
def balancekit_backend_state_changed(
    pool: Pool, backend: Backend, old: BackendState, new: BackendState
) -> None:
    """Called after every state change of a backend, outside the pool's lock.

    ``old`` and ``new`` are :class:`~balancekit.BackendState` members. An
    exception raised here is logged with the plugin's name and does not
    affect balancing.
    """
