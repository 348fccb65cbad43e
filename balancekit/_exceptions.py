"""Every error balancekit raises, in one tree.

::

    BalancekitError
      ConfigError              bad configuration; raised at start-up; .problems
      PluginError              a plugin broke the rules (duplicate name, bad class)
      StoreError               a store's backend failed; wraps the driver's exception
      DiscoveryError           a discovery round could not tell (the last good set stays)
      ProxyError               request-time; carries .pool, never a backend address
        NoEligibleBackend      -> 503 with Retry-After; nothing was sent
        UpstreamError          -> 502
          UpstreamConnectError   nothing was sent; always safe to retry
          UpstreamProtocolError  the backend answered something that is not HTTP
          UpstreamTimeout        -> 504

Transports translate their library's exceptions into this tree at one
boundary each, so the engines never see an aiohttp or httpx exception.
"""

from __future__ import annotations

from dataclasses import dataclass


class BalancekitError(Exception):
    """Base class of every balancekit error."""


@dataclass(frozen=True)
class Problem:
    """One configuration problem: where (a key path) and what."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class ConfigError(BalancekitError, ValueError):
    """The configuration is invalid. Raised at start-up, never per request.

    ``problems`` lists every problem found; ``str()`` shows one per line,
    each as ``key.path: what is wrong``.
    """

    def __init__(self, problems: list[Problem] | str) -> None:
        if isinstance(problems, str):
            problems = [Problem("", problems)]
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class PluginError(BalancekitError):
    """A plugin broke the plugin rules."""


class StoreError(BalancekitError):
    """A store could not be reached or answered with an error: what the
    built-in stores raise, the driver's exception as its cause. Requests
    never see it: the balancer's ``GuardedStore`` turns an outage into
    unpinned balancing."""


class DiscoveryError(BalancekitError):
    """A discovery round could not tell which backends there are (a DNS
    timeout or SERVFAIL, a missing or malformed file): the pool keeps its
    last good set. The message names the DNS name or the file."""


class ProxyError(BalancekitError):
    """A request could not be proxied. ``str()`` names the pool, never a backend.

    ``status_code`` is what the client is answered. ``request_sent`` says
    whether the request may have reached a backend (even in part): one that
    was never sent is always safe to try elsewhere. ``pool`` is set by the
    engine, at the one place a transport's error enters it.
    """

    status_code = 502
    request_sent = True
    #: The detail when the raiser gives none: each kind's message, written once.
    default_detail = "the balancer failed to proxy the request"

    def __init__(
        self, detail: str | None = None, *, pool: str = "", request_sent: bool | None = None
    ) -> None:
        self.pool = pool
        self.detail = detail or self.default_detail
        if request_sent is not None:
            self.request_sent = request_sent
        super().__init__(detail)


class NoEligibleBackend(ProxyError):
    """No backend of the pool may take the request now (all down, ejected,
    draining or full): answered 503 with Retry-After."""

    status_code = 503
    request_sent = False
    #: Backends are eligible but every one is at ``max_connections``: the
    #: request may wait in the pool's queue (``max_pending``).
    full = False


class UpstreamError(ProxyError):
    """The upstream failed: answered 502 (504 for a timeout)."""

    default_detail = "upstream connection failed"

    @classmethod
    def closed(cls) -> UpstreamError:
        return cls("upstream closed the connection")


class UpstreamConnectError(UpstreamError):
    """The backend refused the connection or could not be reached: nothing
    was sent."""

    request_sent = False
    default_detail = "upstream refused the connection"


class UpstreamProtocolError(UpstreamError):
    """The backend answered something that is not valid HTTP/1.1."""

    default_detail = "upstream sent a malformed response"


class UpstreamTimeout(UpstreamError):
    """The backend did not accept, answer or take the body in time: 504.
    A connect timeout is raised with ``request_sent=False``."""

    status_code = 504
    default_detail = "upstream timed out"

    @classmethod
    def connecting(cls) -> UpstreamTimeout:
        """The backend did not accept the connection in time: nothing was sent."""
        return cls("upstream did not accept the connection in time", request_sent=False)

    @classmethod
    def writing(cls) -> UpstreamTimeout:
        """The backend stopped taking the request body."""
        return cls("upstream did not read the request body in time")
