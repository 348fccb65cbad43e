"""The optional base class of algorithms."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, ClassVar, Generic, TypeVar

if TYPE_CHECKING:
    from .._backend import Backend
    from .._request import RequestInfo


class Algorithm:
    """Base class for load-balancing algorithms; subclassing it is optional.

    The pool calls :meth:`pick` under its lock with the eligible backends
    (never an empty sequence), so an algorithm may keep plain state. It reads
    the backends' counters and never writes them. Options come from the
    config's algorithm table as keyword arguments to the constructor::

        class Sticky(Algorithm):
            name = "sticky_first"

            def __init__(self, *, offset: int = 0) -> None:
                self.offset = offset

            def pick(self, backends, request):
                return backends[self.offset % len(backends)]
    """

    name: ClassVar[str] = ""

    def pick(self, backends: Sequence[Backend], request: RequestInfo) -> Backend:
        raise NotImplementedError("The 'pick' method must be implemented.")


T = TypeVar("T")


class MembershipCache(Generic[T]):
    """A table derived from the eligible backends, rebuilt only when they change.

    The pool hands algorithms the same tuple until membership or state
    changes, so an identity check usually settles it; any other sequence is
    compared by its members (and their weights).
    """

    def __init__(self, build: Callable[[Sequence[Backend]], T]) -> None:
        self._build = build
        self._backends: Sequence[Backend] | None = None
        self._signature: tuple[tuple[int, int], ...] = ()
        self._value: T | None = None

    def get(self, backends: Sequence[Backend]) -> T:
        if backends is self._backends and self._value is not None:
            return self._value
        signature = tuple((id(b), b.weight) for b in backends)
        if signature != self._signature or self._value is None:
            self._value = self._build(backends)
            self._signature = signature
        # Hold a tuple only: a list could change in place behind our back.
        self._backends = backends if isinstance(backends, tuple) else None
        return self._value
