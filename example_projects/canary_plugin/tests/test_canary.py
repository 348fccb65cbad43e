"""The plugin's own tests, as a third-party author writes them."""

from __future__ import annotations

from collections import Counter

import pytest
from balancekit_canary import HeaderCanary

from balancekit.testing import check_algorithm, make_backends, make_request

BACKENDS = make_backends(4)
CANARY = BACKENDS[3]


def canary(**options: object) -> HeaderCanary:
    return HeaderCanary(canaries=[CANARY.url], **options)  # type: ignore[arg-type]


def test_keeps_the_balancekit_algorithm_contract() -> None:
    check_algorithm(HeaderCanary, canaries=[CANARY.url], percent=10)


def test_opted_in_requests_reach_the_canary_and_the_rest_do_not() -> None:
    algorithm = canary()
    opted = make_request(headers={"X-Canary": "1"})
    assert {algorithm.pick(BACKENDS, opted) for _ in range(5)} == {CANARY}
    plain = make_request()
    assert {algorithm.pick(BACKENDS, plain) for _ in range(9)} == set(BACKENDS[:3])


def test_percent_sends_an_even_share_without_the_header() -> None:
    algorithm = canary(percent=10)
    picks = Counter(algorithm.pick(BACKENDS, make_request()) for _ in range(1000))
    assert picks[CANARY] == 100


def test_falls_back_when_one_side_has_no_eligible_backend() -> None:
    algorithm = canary()
    stable_only = BACKENDS[:3]
    assert algorithm.pick(stable_only, make_request(headers={"X-Canary": "1"})) in stable_only
    assert algorithm.pick([CANARY], make_request()) is CANARY


def test_canaries_match_backends_written_with_a_slash_or_capitals() -> None:
    backends = make_backends(2)
    written = "HTTP" + backends[1].url.removeprefix("http") + "/"  # HTTP://127.99.0.2:8080/
    algorithm = HeaderCanary(canaries=[written])
    assert algorithm.pick(backends, make_request(headers={"X-Canary": "yes"})) is backends[1]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"canaries": []}, "canaries: must name at least one"),
        ({"canaries": "http://x"}, "canaries: must be a list"),
        ({"canaries": [3]}, "canaries: must be a list"),
        ({"canaries": ["10.0.0.9:8000"]}, "canaries: '10.0.0.9:8000' is not a backend URL"),
        ({"canaries": ["http://x"], "percent": 150}, "percent: must be a number between 0 and"),
        ({"canaries": ["http://x"], "percent": "5"}, "percent: must be a number between 0 and"),
        ({"canaries": ["http://x"], "percent": True}, "percent: must be a number between 0 and"),
        ({"canaries": ["http://x"], "header": ""}, "header: must be a header name"),
    ],
)
def test_bad_options_name_the_key(options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        HeaderCanary(**options)  # type: ignore[arg-type]
