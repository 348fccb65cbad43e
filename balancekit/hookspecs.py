"""The plugin API of balancekit: every hook a plugin may implement.

A plugin is a module or object with functions decorated by
:data:`hookimpl`, registered through the ``balancekit`` entry-point group.
balancekit's own algorithms, health checks, persistence types, stores and
discovery types are registered through these same hooks.
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
def balancekit_register_discovery() -> list[type[Any]]:  # type: ignore[empty-body]
    """Return discovery classes, selectable by ``name`` as
    ``[pools.NAME.discovery] type``: where a pool finds backends beyond its
    static ``backends``.

    A discovery class takes its table's own keys (everything but ``type``;
    ``interval`` too when its constructor has that parameter) as keyword
    arguments, so its signature is the schema, and has
    ``async def resolve(self)`` returning the backends there are now, as URL
    strings or ``{"url", "weight", "backup"}`` tables::

        class Static:
            name = "static"

            def __init__(self, *, urls: list[str], interval: float = 10.0) -> None:
                self.urls, self.interval = urls, interval

            async def resolve(self):
                return list(self.urls)

    Called once each time a :class:`~balancekit.Balancer` is built, whose
    start-up builds each configured class once to check its options (a
    ``TypeError`` or ``ValueError`` from the constructor is a
    ``ConfigError``; a message ``"port: ..."`` names the key). The running
    balancer builds a fresh instance in the event loop that runs its
    background work and calls ``resolve`` every ``interval`` seconds (its
    ``interval`` attribute when the table sets none; at most once a second),
    sooner when the instance has a ``ttl`` attribute (seconds the last
    answer is good for) that is shorter. ``aclose()``, if defined, is
    awaited when the balancer stops.

    An exception raised by ``resolve`` means "cannot tell now": the pool
    keeps its last good set, the failure is logged once per outage (with
    the instance's ``target`` attribute, if any, and the message) and
    counted in ``balancekit_discovery_errors_total``, and ``resolve`` is
    retried with a back-off up to the interval. An empty list empties the
    discovered part of the pool; an entry that is not a valid backend is
    logged and left out, the others applied.
    """


@hookspec
def balancekit_backend_state_changed(
    pool: Pool, backend: Backend, old: BackendState, new: BackendState
) -> None:
    """Called after every state change of a backend, outside the pool's lock.

    ``old`` and ``new`` are :class:`~balancekit.BackendState` members. An
    exception raised here is logged with the plugin's name and does not
    affect balancing.
    """
