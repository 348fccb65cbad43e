"""Background work for WSGI servers: an event loop in a daemon thread.

A WSGI process has no event loop of its own, yet health checks (and, later,
store syncing) are asyncio code. Each process that serves a routed request
gets one daemon thread running a private loop, started lazily on that first
request (never at import, never in a pre-fork master before it forks) and
stopped at interpreter exit. A forked child starts with none: the parent's
thread does not exist there, and it makes its own on its first request.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import threading
import weakref
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._balancer import Balancer

logger = logging.getLogger("balancekit")

#: Seconds to wait for the loop to start its work, or to finish it at exit.
START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0

_running: weakref.WeakSet[BackgroundLoop] = weakref.WeakSet()


class BackgroundLoop:
    """One daemon thread with an event loop that runs ``balancer.astart()``."""

    def __init__(self, balancer: Balancer) -> None:
        self._balancer = weakref.ref(balancer)
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._pid = 0

    @property
    def running(self) -> bool:
        return self._thread is not None  # forgotten in a forked child

    def ensure_started(self) -> None:
        """Start the thread in this process unless it runs already."""
        if self.running:
            return
        with self._lock:
            if self._thread is not None:  # another thread was quicker
                return
            balancer = self._balancer()
            if balancer is None:
                return
            loop = asyncio.new_event_loop()
            ready = threading.Event()
            thread = threading.Thread(
                target=self._run, args=(loop, ready), name="balancekit", daemon=True
            )
            thread.start()
            ready.wait(START_TIMEOUT)
            future = asyncio.run_coroutine_threadsafe(balancer.astart(), loop)
            try:
                future.result(START_TIMEOUT)
            except FutureTimeout:
                logger.error("balancekit: background work did not start in time")
            self._loop, self._thread, self._pid = loop, thread, os.getpid()
            _running.add(self)

    @staticmethod
    def _run(loop: asyncio.AbstractEventLoop, ready: threading.Event) -> None:
        asyncio.set_event_loop(loop)
        loop.call_soon(ready.set)
        try:
            loop.run_forever()
        finally:
            loop.close()

    def stop(self) -> None:
        """Stop the background work and the thread; a no-op in a forked child."""
        with self._lock:
            loop, thread = self._loop, self._thread
            if loop is None or thread is None or self._pid != os.getpid():
                return
            self._loop = self._thread = None
        balancer = self._balancer()
        if balancer is not None and not loop.is_closed():
            future = asyncio.run_coroutine_threadsafe(balancer.aclose(), loop)
            try:
                future.result(STOP_TIMEOUT)
            except (FutureTimeout, RuntimeError):
                logger.warning("balancekit: background work did not stop in time")
        loop.call_soon_threadsafe(loop.stop)
        thread.join(STOP_TIMEOUT)
        _running.discard(self)


def _forget_after_fork() -> None:
    # The child has no copy of the parent's threads; its loop objects are
    # unusable there. Dropping them (not closing: the parent still uses the
    # same selector) lets the child start its own.
    for background in list(_running):
        background._loop = background._thread = None
        background._pid = 0
        background._lock = threading.Lock()  # another thread may have held it
    _running.clear()


@atexit.register
def _stop_all() -> None:
    for background in list(_running):
        background.stop()


os.register_at_fork(after_in_child=_forget_after_fork)
