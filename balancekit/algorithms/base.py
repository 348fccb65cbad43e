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

    # Optional feedback, as HAProxy's ``take_conn``/``drop_conn`` lb ops: an
    # algorithm that keeps an ordered structure (a heap, buckets) updates it
    # here instead of scanning every backend on each pick. The pool calls
    # them under its lock, and does not call the base class's no-ops at all.

    def prepare(self, backends: Sequence[Backend]) -> None:
        """The eligible backends changed to ``backends``: derive tables now.

        Called on every change of membership or state, so that a ring or a
        lookup table is built when the change happens, not on the first
        request after it.
        """

    def acquired(self, backend: Backend) -> None:
        """A request was sent to ``backend`` (its ``active_requests`` is counted)."""

    def released(self, backend: Backend) -> None:
        """A request on ``backend`` ended; its counters and latency are updated."""


def overrides(algorithm: object, method: str) -> bool:
    """Whether ``algorithm`` has its own ``method``, not the base class's no-op."""
    own = getattr(type(algorithm), method, None)
    return own is not None and own is not getattr(Algorithm, method)


T = TypeVar("T")


class MembershipCache(Generic[T]):
    """A table derived from the eligible backends, rebuilt only when they change.

    The pool hands algorithms the same tuple until membership or state
    changes, so an identity check usually settles it; any other sequence is
    compared by its members (and their weights). Two tables are kept, for
    the pool's primaries and its backups.
    """

    SIZE = 2

    def __init__(self, build: Callable[[Sequence[Backend]], T]) -> None:
        self._build = build
        # Most recently used first: (tuple or None, signature, table).
        self._entries: list[tuple[Sequence[Backend] | None, tuple[tuple[int, float], ...], T]] = []

    def get(self, backends: Sequence[Backend]) -> T:
        entries = self._entries
        if entries and entries[0][0] is backends:
            return entries[0][2]
        for i, (held, _, value) in enumerate(entries):
            if held is backends:
                entries.insert(0, entries.pop(i))
                return value
        signature = tuple((id(b), b.effective_weight) for b in backends)
        same = [i for i, entry in enumerate(entries) if entry[1] == signature]
        value = entries.pop(same[0])[2] if same else self._build(backends)
        # Hold a tuple only: a list could change in place behind our back.
        entries.insert(0, (backends if isinstance(backends, tuple) else None, signature, value))
        del entries[self.SIZE :]
        return value
