"""Type aliases and the Protocols behind the plugin contract."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, MutableMapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

if TYPE_CHECKING:
    from ._backend import Backend
    from ._request import RequestInfo

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: Raw HTTP headers, as ASGI carries them: lower-case names, in order, repeats kept.
RawHeaders = list[tuple[bytes, bytes]]


class SupportsPick(Protocol):
    """What an algorithm plugin is: a ``name`` and a ``pick``.

    ``pick`` is called under the pool's lock with a non-empty sequence of
    eligible backends and must return one of them.
    """

    name: ClassVar[str]

    def pick(self, backends: Sequence[Backend], request: RequestInfo) -> Backend: ...


class SupportsHealthCheck(Protocol):
    """An active health check: ``check`` answers whether a backend is healthy."""

    name: ClassVar[str]

    async def check(self, backend: Backend) -> bool: ...


class SupportsResolve(Protocol):
    """A discovery plugin: ``resolve`` answers the backends there are now.

    It returns URL strings or ``{"url", "weight", "backup"}`` tables and
    raises when it cannot tell (the pool then keeps its last good set).
    """

    name: str

    async def resolve(self) -> Sequence[str | Mapping[str, Any]]: ...
