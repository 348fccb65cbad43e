"""Outlier detection beyond failure streaks: the ejection multiplier's
decay, Envoy's success-rate and failure-percentage detectors, and which
statuses count as failures (``failure_statuses``).

Every pool here is a real one on an injected clock; requests go through
``acquire`` and ``release`` as the engines send them, pinned to a chosen
backend with ``prefer``.
"""

from __future__ import annotations

import pytest

from balancekit import BackendState, Balancer, ConfigError, RequestInfo, load_config
from balancekit._engine_core import Attempts
from balancekit._plugins import make_plugin_manager

REQUEST = RequestInfo("GET", "/")
URLS = [f"http://127.0.0.1:{9001 + i}" for i in range(6)]
NO_STREAKS = 1_000_000  # consecutive failures that never come: rates only


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_pool(clock, n=6, **outlier):
    config = {
        "pools": {
            "api": {
                "backends": URLS[:n],
                "panic_threshold": 0,
                "outlier_detection": {"consecutive_failures": NO_STREAKS, **outlier},
            }
        }
    }
    manager = make_plugin_manager(entry_points=False)
    return Balancer(config, plugin_manager=manager, clock=clock).pools["api"]


def answer(pool, url, requests, failures):
    """``requests`` requests on ``url``, the first ``failures`` of them failed."""
    backend = pool.backend(url)
    for i in range(requests):
        got = pool.acquire(REQUEST, prefer=backend)
        assert got is backend
        pool.release(got, ok=i >= failures, latency_ms=5.0)


def end_interval(pool, clock, seconds=10.0):
    """Let the interval pass; the next request on the pool judges it."""
    clock.now += seconds
    pool.release(pool.acquire(REQUEST), ok=True, latency_ms=5.0)


def states(pool):
    return [b.state for b in pool.backends]


HEALTHY, EJECTED = BackendState.HEALTHY, BackendState.EJECTED


# --- the ejection multiplier decays ------------------------------------------------


def fail(pool, url, times=2):
    answer(pool, url, times, times)


@pytest.mark.parametrize(
    ("in_service", "expected"),
    [
        pytest.param(0.0, 40.0, id="at-once-third-ejection"),
        pytest.param(9.9, 40.0, id="not-yet-a-whole-base-time"),
        pytest.param(10.0, 20.0, id="one-base-time-forgives-one"),
        pytest.param(25.0, 10.0, id="two-forgive-both"),
        pytest.param(10_000.0, 10.0, id="long-recovered-never-below-base"),
    ],
)
def test_the_multiplier_falls_back_by_one_per_base_time_in_service(in_service, expected):
    clock = Clock()
    pool = make_pool(
        clock, n=3, consecutive_failures=2, base_ejection_time=10, max_ejection_time=1000
    )
    a = pool.backend(URLS[0])
    fail(pool, URLS[0])
    assert a.ejected_until == 1010.0  # first: base
    clock.now = 1010.0
    fail(pool, URLS[0])
    assert a.ejected_until == 1030.0  # second at once: 2 x base
    clock.now = 1030.0 + in_service
    fail(pool, URLS[0])
    assert a.state is EJECTED
    assert a.ejected_until == clock.now + expected


def test_decay_counts_from_the_end_of_the_ejection_not_from_its_noticing():
    clock = Clock()
    pool = make_pool(clock, n=3, consecutive_failures=2, base_ejection_time=10)
    a = pool.backend(URLS[0])
    fail(pool, URLS[0])
    clock.now = 1010.0
    fail(pool, URLS[0])  # out until 1030, with nothing asking the pool till 1050
    clock.now = 1050.0
    fail(pool, URLS[0])  # 20 s in service since 1030: both ejections forgiven
    assert a.ejected_until == 1050.0 + 10


def test_ejections_still_double_and_cap_without_time_in_service():
    clock = Clock()
    pool = make_pool(
        clock, n=3, consecutive_failures=1, base_ejection_time=10, max_ejection_time=25
    )
    a = pool.backend(URLS[0])
    lengths = []
    for _ in range(4):
        fail(pool, URLS[0], times=1)
        lengths.append(a.ejected_until - clock.now)
        clock.now = a.ejected_until
    assert lengths == [10.0, 20.0, 25.0, 25.0]


# --- success rate ------------------------------------------------------------------


def test_success_rate_ejects_exactly_the_outlier():
    clock = Clock()
    pool = make_pool(clock, success_rate={}, base_ejection_time=30)
    # 120 answers each; success rates 99.2, 98.3, 99.2, 97.5, 98.3 and 75 %:
    # mean 94.6, stdev 8.7, so the bar is 94.6 - 1.9 x 8.7 = 78.0 %.
    for url, failures in zip(URLS, [1, 2, 1, 3, 2, 30], strict=True):
        answer(pool, url, 120, failures)
    assert states(pool) == [HEALTHY] * 6  # judged only when the interval ends
    end_interval(pool, clock)
    assert states(pool) == [HEALTHY] * 5 + [EJECTED]
    assert pool.backend(URLS[5]).ejected_until == clock.now + 30


def test_success_rate_leaves_a_merely_worse_backend_in():
    clock = Clock()
    pool = make_pool(clock, success_rate={})
    # 90 % against 99 %: below the mean, but within 1.9 standard deviations
    # when the spread is this wide (rates 99, 97, 95, 93, 91, 90).
    for url, failures in zip(URLS, [1, 3, 5, 7, 9, 10], strict=True):
        answer(pool, url, 100, failures)
    end_interval(pool, clock)
    assert states(pool) == [HEALTHY] * 6


@pytest.mark.parametrize(
    ("settings", "requests"),
    [
        pytest.param({}, 99, id="below-request-volume"),
        pytest.param({"minimum_hosts": 7}, 120, id="fewer-hosts-than-minimum"),
        pytest.param({"request_volume": 500}, 120, id="volume-raised"),
    ],
)
def test_success_rate_needs_volume_on_enough_hosts(settings, requests):
    clock = Clock()
    pool = make_pool(clock, success_rate=settings)
    for url, failures in zip(URLS, [0, 0, 0, 0, 0, 60], strict=True):
        answer(pool, url, requests, failures)
    end_interval(pool, clock)
    assert states(pool) == [HEALTHY] * 6


def test_success_rate_only_counts_hosts_with_volume():
    clock = Clock()
    pool = make_pool(clock, success_rate={"minimum_hosts": 5})
    # The last backend fails everything, but on too few requests to be judged.
    for url, failures in zip(URLS[:5], [1, 0, 2, 0, 40], strict=True):
        answer(pool, url, 100, failures)
    answer(pool, URLS[5], 50, 50)
    end_interval(pool, clock)
    assert states(pool) == [HEALTHY] * 4 + [EJECTED, HEALTHY]


def test_each_interval_is_judged_on_its_own_counts():
    clock = Clock()
    pool = make_pool(clock, success_rate={"interval": 5})
    for url, failures in zip(URLS, [0, 1, 0, 1, 0, 0], strict=True):
        answer(pool, url, 100, failures)
    end_interval(pool, clock, 5)
    assert states(pool) == [HEALTHY] * 6
    # Next interval: the last backend goes bad, on fresh counts only.
    for url, failures in zip(URLS, [0, 1, 0, 1, 0, 50], strict=True):
        answer(pool, url, 100, failures)
    end_interval(pool, clock, 5)
    assert states(pool) == [HEALTHY] * 5 + [EJECTED]


# --- failure percentage ------------------------------------------------------------


def test_failure_percentage_ejects_exactly_the_outlier():
    clock = Clock()
    pool = make_pool(clock, failure_percentage={"threshold": 50})
    for url, failures in zip(URLS, [5, 10, 0, 49, 0, 60], strict=True):
        answer(pool, url, 100, failures)
    end_interval(pool, clock)
    assert states(pool) == [HEALTHY] * 5 + [EJECTED]


def test_failure_percentage_at_the_threshold_is_ejected():
    clock = Clock()
    pool = make_pool(clock, failure_percentage={"threshold": 50, "minimum_hosts": 2})
    answer(pool, URLS[0], 60, 30)  # exactly 50 %
    answer(pool, URLS[1], 60, 0)
    end_interval(pool, clock)
    assert states(pool) == [EJECTED] + [HEALTHY] * 5


@pytest.mark.parametrize(
    ("settings", "requests"),
    [
        pytest.param({}, 49, id="below-request-volume"),
        pytest.param({"minimum_hosts": 7}, 100, id="fewer-hosts-than-minimum"),
    ],
)
def test_failure_percentage_needs_volume_on_enough_hosts(settings, requests):
    clock = Clock()
    pool = make_pool(clock, failure_percentage=settings)
    for url, failures in zip(URLS, [0, 0, 0, 0, 0, requests], strict=True):
        answer(pool, url, requests, failures)
    end_interval(pool, clock)
    assert states(pool) == [HEALTHY] * 6


def test_rate_ejections_respect_max_ejection_percent_worst_first():
    clock = Clock()
    pool = make_pool(clock, failure_percentage={"threshold": 50}, max_ejection_percent=20)
    for url, failures in zip(URLS, [0, 90, 0, 0, 100, 0], strict=True):
        answer(pool, url, 100, failures)
    end_interval(pool, clock)
    # 20 % of six backends is one: the one failing everything.
    assert states(pool) == [HEALTHY] * 4 + [EJECTED, HEALTHY]


def test_rate_ejections_lengthen_and_decay_like_the_others():
    clock = Clock()
    pool = make_pool(
        clock, failure_percentage={"threshold": 50, "interval": 10}, base_ejection_time=30
    )
    bad = pool.backend(URLS[5])

    def bad_interval():
        for url in URLS:
            answer(pool, url, 100, 100 if url == URLS[5] else 0)
        end_interval(pool, clock)

    bad_interval()
    assert bad.ejected_until == clock.now + 30
    clock.now = bad.ejected_until
    bad_interval()  # back 10 s later, bad again: the second ejection doubles
    assert bad.ejected_until == clock.now + 60
    clock.now = bad.ejected_until + 60  # two base times in service
    bad_interval()
    assert bad.ejected_until == clock.now + 30


def test_without_rate_tables_no_interval_ejects():
    clock = Clock()
    pool = make_pool(clock)
    for url, failures in zip(URLS, [0, 0, 0, 0, 0, 100], strict=True):
        answer(pool, url, 100, failures)
    end_interval(pool, clock, 60)
    assert states(pool) == [HEALTHY] * 6


# --- which statuses are failures -------------------------------------------------


def outlier_config(**outlier):
    config = load_config({"pools": {"api": {"backends": [URLS[0]], "outlier_detection": outlier}}})
    detection = config.pools["api"].outlier_detection
    assert detection is not None
    return detection


@pytest.mark.parametrize(
    ("text", "statuses"),
    [
        pytest.param("500-599", set(range(500, 600)), id="range"),
        pytest.param("502-504,429", {429, 502, 503, 504}, id="range-and-status"),
        pytest.param(" 503 , 429 - 430 ", {429, 430, 503}, id="spaces"),
        pytest.param("503", {503}, id="one"),
        pytest.param("503,500-504", {500, 501, 502, 503, 504}, id="overlap"),
    ],
)
def test_failure_statuses_are_parsed_once_at_load(text, statuses):
    detection = outlier_config(failure_statuses=text)
    assert detection.failure_statuses == frozenset(statuses)


def test_failure_statuses_default_to_5xx_and_dump_back_as_text():
    assert outlier_config().failure_statuses == frozenset(range(500, 600))
    dumped = outlier_config(failure_statuses="429,502-504").model_dump()
    assert dumped["failure_statuses"] == "429,502-504"


@pytest.mark.parametrize(
    ("outlier", "path", "message"),
    [
        pytest.param(
            {"failure_statuses": "5xx"},
            "failure_statuses",
            "must be statuses and ranges such as '500-599' or '502-504,429', got '5xx'",
            id="not-a-status",
        ),
        pytest.param(
            {"failure_statuses": "500,,502"},
            "failure_statuses",
            "must be statuses and ranges such as '500-599' or '502-504,429', got '500,,502'",
            id="empty-item",
        ),
        pytest.param(
            {"failure_statuses": ""},
            "failure_statuses",
            "must be statuses and ranges such as '500-599' or '502-504,429', got ''",
            id="empty",
        ),
        pytest.param(
            {"failure_statuses": "504-502"},
            "failure_statuses",
            "must name statuses from 200 to 599, ranges low to high, got '504-502'",
            id="backwards-range",
        ),
        pytest.param(
            {"failure_statuses": "500-600"},
            "failure_statuses",
            "must name statuses from 200 to 599, ranges low to high, got '500-600'",
            id="out-of-range",
        ),
        pytest.param(
            {"failure_statuses": [500, 502]},
            "failure_statuses",
            "must be a string of statuses and ranges such as '500-599' or '502-504,429',"
            " got [500, 502]",
            id="a-list",
        ),
        pytest.param(
            {"success_rate": {"stdev_factor": 0}},
            "success_rate.stdev_factor",
            "must be a positive number, got 0",
            id="stdev-factor-zero",
        ),
        pytest.param(
            {"success_rate": {"minimum_hosts": 0}},
            "success_rate.minimum_hosts",
            "must be a positive integer, got 0",
            id="minimum-hosts-zero",
        ),
        pytest.param(
            {"success_rate": {"intervl": 5}},
            "success_rate.intervl",
            "unknown key",
            id="unknown-key",
        ),
        pytest.param(
            {"failure_percentage": {"threshold": 120}},
            "failure_percentage.threshold",
            "must be a percentage from 0 to 100, got 120",
            id="threshold-over-100",
        ),
        pytest.param(
            {"failure_percentage": {"interval": 0}},
            "failure_percentage.interval",
            "must be a positive number of seconds, got 0",
            id="interval-zero",
        ),
        pytest.param(
            {"failure_percentage": True},
            "failure_percentage",
            "must be a table, got True",
            id="not-a-table",
        ),
    ],
)
def test_bad_outlier_settings_name_their_key_path(outlier, path, message):
    with pytest.raises(ConfigError) as info:
        outlier_config(**outlier)
    (problem,) = info.value.problems
    assert problem.path == f"pools.api.outlier_detection.{path}"
    assert problem.message.startswith(message)


def test_rate_tables_take_envoys_defaults():
    detection = outlier_config(success_rate={}, failure_percentage={})
    assert detection.success_rate is not None and detection.failure_percentage is not None
    assert detection.success_rate.model_dump() == {
        "stdev_factor": 1.9,
        "minimum_hosts": 5,
        "request_volume": 100,
        "interval": 10.0,
    }
    assert detection.failure_percentage.model_dump() == {
        "threshold": 85,
        "minimum_hosts": 5,
        "request_volume": 50,
        "interval": 10.0,
    }
    assert outlier_config().success_rate is None
    assert outlier_config().failure_percentage is None


@pytest.mark.parametrize(
    ("outlier", "failures", "passes"),
    [
        pytest.param(None, [500, 503, 599], [200, 404, 429], id="no-table-any-5xx"),
        pytest.param({}, [500, 503, 599], [200, 404, 429], id="default-5xx"),
        pytest.param({"failure_statuses": "502-504,429"}, [429, 502, 504], [500, 501, 505, 404]),
    ],
)
def test_the_pool_says_which_statuses_are_failures(outlier, failures, passes):
    config = {"pools": {"api": {"backends": [URLS[0]]}}}
    if outlier is not None:
        config["pools"]["api"]["outlier_detection"] = outlier
    pool = Balancer(config, plugin_manager=make_plugin_manager(entry_points=False)).pools["api"]
    assert all(pool.is_failure(status) for status in failures)
    assert not any(pool.is_failure(status) for status in passes)


def test_answers_count_by_failure_statuses_and_connection_errors_still_fail():
    clock = Clock()
    pool = make_pool(clock, n=3, consecutive_failures=3, failure_statuses="429")
    a = pool.backend(URLS[0])

    def try_once(status=None):
        attempts = Attempts(pool, REQUEST, pinned=a)
        assert attempts.next() is a
        if status is None:
            attempts.release(ok=False)  # what the engines do on a refused connection
        else:
            attempts.answered(status)

    try_once(500)
    try_once(503)
    assert a.failures_total == 0 and a.consecutive_failures == 0  # not failures here
    try_once(429)
    try_once()
    assert a.failures_total == 2 and a.consecutive_failures == 2
    try_once(429)
    assert a.state is EJECTED


def test_without_the_table_a_5xx_is_still_a_slow_failed_sample():
    clock = Clock()
    config = {"pools": {"api": {"backends": [URLS[0]]}}}
    manager = make_plugin_manager(entry_points=False)
    pool = Balancer(config, plugin_manager=manager, clock=clock).pools["api"]
    attempts = Attempts(pool, REQUEST)
    backend = attempts.next()
    attempts.answered(503)
    assert backend.failures_total == 1
    assert backend.latency_ewma_ms is not None and backend.latency_ewma_ms >= 1000.0
