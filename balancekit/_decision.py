"""Retry and outcome verdicts: pure functions, no I/O.

Both engines ask these questions the same way, so the rules of
CONTRACT section 4 live in one place.
"""

from __future__ import annotations

from ._exceptions import NoEligibleBackend, ProxyError

#: RFC 9110 section 9.2.2; POST and PATCH are not among them.
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})


def may_retry(
    error: ProxyError,
    *,
    method: str,
    attempt: int,
    attempts: int,
    response_started: bool,
    body_replayable: bool,
) -> bool:
    """Whether a failed try may be repeated on another backend.

    ``attempt`` counts tries so far (the first is 1) and ``attempts`` is the
    pool's limit on all tries. A request is retried only when nothing was
    sent, or when its method is idempotent, its body can be sent again and
    no byte of a response reached the client.
    """
    if response_started or attempt >= attempts or isinstance(error, NoEligibleBackend):
        return False
    if not body_replayable:
        return False
    if not error.request_sent:
        return True
    return method in IDEMPOTENT_METHODS


#: The answers that count against their backend unless a pool's
#: ``failure_statuses`` says otherwise: every 5xx, as Envoy's consecutive_5xx.
FIVE_XX = frozenset(range(500, 600))
