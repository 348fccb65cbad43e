from __future__ import annotations

import pytest

from balancekit import (
    NoEligibleBackend,
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from balancekit._decision import FIVE_XX, may_retry

REFUSED = UpstreamConnectError("refused")
RESET = UpstreamError("reset")
GARBAGE = UpstreamProtocolError("garbage")
SLOW = UpstreamTimeout("slow")
CONNECT_SLOW = UpstreamTimeout("slow connect", request_sent=False)


def verdict(error, method="GET", *, attempt=1, attempts=3, started=False, replayable=True):
    return may_retry(
        error,
        method=method,
        attempt=attempt,
        attempts=attempts,
        response_started=started,
        body_replayable=replayable,
    )


@pytest.mark.parametrize(
    ("error", "method", "expected"),
    [
        pytest.param(REFUSED, "POST", True, id="refused-post-nothing-sent"),
        pytest.param(CONNECT_SLOW, "POST", True, id="connect-timeout-post"),
        pytest.param(RESET, "GET", True, id="reset-get"),
        pytest.param(RESET, "PUT", True, id="reset-put"),
        pytest.param(RESET, "POST", False, id="reset-post-was-sent"),
        pytest.param(RESET, "PATCH", False, id="reset-patch"),
        pytest.param(GARBAGE, "GET", True, id="garbage-get"),
        pytest.param(SLOW, "GET", True, id="read-timeout-get"),
        pytest.param(SLOW, "POST", False, id="read-timeout-post"),
        pytest.param(NoEligibleBackend("none"), "GET", False, id="nothing-to-retry-on"),
    ],
)
def test_what_may_be_retried(error, method, expected) -> None:
    assert verdict(error, method) is expected


def test_attempts_count_every_try_the_first_included() -> None:
    assert verdict(REFUSED, attempt=1, attempts=2)
    assert not verdict(REFUSED, attempt=2, attempts=2)
    assert not verdict(REFUSED, attempt=1, attempts=1)


def test_never_after_response_bytes() -> None:
    assert not verdict(RESET, "GET", started=True)


def test_a_consumed_body_cannot_be_sent_again() -> None:
    assert not verdict(RESET, "PUT", replayable=False)
    assert not verdict(REFUSED, "POST", replayable=False)


@pytest.mark.parametrize(
    ("status", "failed"), [(200, False), (404, False), (499, False), (500, True), (503, True)]
)
def test_5xx_counts_as_failure(status: int, failed: bool) -> None:
    assert (status in FIVE_XX) is failed


def test_proxy_errors_name_the_pool_and_carry_their_status() -> None:
    error = UpstreamTimeout("upstream timed out", pool="api")
    assert (error.status_code, error.pool, str(error)) == (504, "api", "upstream timed out")
    assert UpstreamProtocolError("x").status_code == 502
    assert NoEligibleBackend("x").status_code == 503
