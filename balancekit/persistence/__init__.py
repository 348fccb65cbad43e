"""Session persistence: requests of one client or session stay on one backend.

Built-in types, registered through the same hook as a plugin's:

- ``cookie``: the response carries a signed cookie naming the backend (no
  store, nothing shared: the client carries its pin);
- ``session``: a session key from a cookie or header, mapped to a backend
  in the balancer's store (``redis://`` to share it between processes).

A type is a class with a ``name`` and four methods; the engines call
``find``/``afind`` before the pick and ``remember``/``aremember`` once the
backend that answered is known and differs from the pin. Store failures
never reach a request: the store is wrapped (see ``balancekit.stores``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from ..hookspecs import hookimpl
from .cookie import CookiePersistence
from .session import SessionPersistence

if TYPE_CHECKING:
    from .._backend import Backend
    from .._pool import Pool
    from .._request import RequestInfo
    from .._types import RawHeaders

__all__ = ["CookiePersistence", "Persistence", "SessionPersistence"]


class Persistence(Protocol):
    """What a persistence type is (a plugin's class need not subclass it)."""

    name: ClassVar[str]

    def find(self, request: RequestInfo, pool: Pool) -> Backend | None:
        """The backend ``request`` is pinned to, or None (no pin, or a bad one)."""
        ...

    async def afind(self, request: RequestInfo, pool: Pool) -> Backend | None: ...

    def remember(self, request: RequestInfo, backend: Backend, pool: Pool) -> RawHeaders:
        """Pin ``request``'s session to ``backend``; headers for the response."""
        ...

    async def aremember(self, request: RequestInfo, backend: Backend, pool: Pool) -> RawHeaders: ...


@hookimpl(trylast=True)
def balancekit_register_persistence() -> list[type[Any]]:
    return [CookiePersistence, SessionPersistence]
