"""balancekit.testing: the kit third-party algorithm authors run."""

from __future__ import annotations

import pytest

from balancekit._plugins import make_plugin_manager
from balancekit.testing import AlgorithmCheckFailed, check_algorithm, make_backends

BUILTINS = make_plugin_manager(entry_points=False).classes("algorithm")
OPTIONS: dict[str, dict[str, object]] = {
    "consistent_hash": {"key": "header:X-User"},
    "maglev": {"key": "cookie:sid", "table_size": 251},
}


@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_every_builtin_passes_the_kit(name: str) -> None:
    check_algorithm(BUILTINS[name][0], **OPTIONS.get(name, {}))


class Outsider:
    name = "outsider"

    def pick(self, backends, request):
        return make_backends(1)[0]


class Nameless:
    def pick(self, backends, request):
        return backends[0]


class EmptyOk:
    name = "empty_ok"

    def pick(self, backends, request):
        return backends[0] if backends else None


class Picky:
    name = "picky"

    def pick(self, backends, request):
        return backends[1]


@pytest.mark.parametrize(
    ("cls", "options", "message"),
    [
        pytest.param(Outsider, {}, "which is not one of the", id="foreign-backend"),
        pytest.param(Nameless, {}, "needs a class attribute 'name'", id="no-name"),
        pytest.param(EmptyOk, {}, "with no backends returned None", id="empty"),
        pytest.param(Picky, {}, "raised IndexError", id="one-backend"),
        pytest.param(Picky, {"speed": 3}, "takes no option 'speed'", id="unknown-option"),
    ],
)
def test_the_kit_explains_what_is_wrong(cls, options, message) -> None:
    with pytest.raises(AlgorithmCheckFailed) as info:
        check_algorithm(cls, **options)
    assert message in str(info.value)
