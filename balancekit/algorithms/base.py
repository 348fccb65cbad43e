"""The optional base class of algorithms."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar

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
