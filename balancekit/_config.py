"""The configuration schema: parsed once, at start-up, into frozen models.

The same schema is accepted from a dict, a TOML file or a ready
``BalancerConfig``. pydantic does the type checking; this module turns its
errors into balancekit's own messages, each naming the key path the way a
user wrote it (``pools.api.backends[1].weight: must be a positive integer,
got -3``), with a "did you mean" for unknown keys.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from ._exceptions import ConfigError, Problem

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_TIMEOUTS = {"connect": 5.0, "read": 60.0, "write": 60.0}
DEFAULT_RETRIES = {"attempts": 2, "budget_percent": 20}
TRANSPORTS = ("aiohttp", "httpx", "httptools")


def _positive_int(value: int) -> int:
    if value <= 0:
        raise ValueError(f"must be a positive integer, got {value!r}")
    return value


def _non_negative_int(value: int) -> int:
    if value < 0:
        raise ValueError(f"must be zero or a positive integer, got {value!r}")
    return value


def _positive_duration(value: float) -> float:
    if not value > 0:
        raise ValueError(f"must be a positive number of seconds, got {value!r}")
    return value


def _non_negative_duration(value: float) -> float:
    if not value >= 0:
        raise ValueError(f"must be zero or a positive number of seconds, got {value!r}")
    return value


def _percent(value: float) -> float:
    if not 0 <= value <= 100:
        raise ValueError(f"must be a percentage from 0 to 100, got {value!r}")
    return value


def _cidrs(value: Any) -> tuple[IPNetwork, ...]:
    if not isinstance(value, list | tuple):
        raise ValueError(f"must be a list of CIDRs such as '10.0.0.0/8', got {value!r}")
    networks = []
    for item in value:
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except (TypeError, ValueError):
            raise ValueError(
                f"must be a list of CIDRs such as '10.0.0.0/8', got {item!r}"
            ) from None
    return tuple(networks)


PositiveInt = Annotated[int, AfterValidator(_positive_int)]
NonNegativeInt = Annotated[int, AfterValidator(_non_negative_int)]
Duration = Annotated[float, AfterValidator(_positive_duration)]
OptionalDuration = Annotated[float, AfterValidator(_non_negative_duration)]
Percent = Annotated[float, AfterValidator(_percent)]
CIDRList = Annotated[tuple[IPNetwork, ...], BeforeValidator(_cidrs)]


class Schema(BaseModel):
    """A table of the configuration: unknown keys refused, no coercion."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


M = TypeVar("M", bound=BaseModel)


class _PluginTable(BaseModel):
    """A table whose other keys belong to a plugin, checked when it is built."""

    model_config = ConfigDict(extra="allow", frozen=True, strict=True)

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


def _url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"must be an http:// or https:// URL, got {value!r}")
    if not parts.hostname:
        raise ValueError(f"must name a host, got {value!r}")
    try:
        parts.port  # noqa: B018 -- raises on a port out of range
    except ValueError:
        raise ValueError(f"has an invalid port, got {value!r}") from None
    if parts.query or parts.fragment:
        raise ValueError(f"must not carry a query or fragment, got {value!r}")
    return value


def _table_from_url(value: Any) -> Any:
    return {"url": value} if isinstance(value, str) else value


def _table_from_name(value: Any) -> Any:
    return {"name": value} if isinstance(value, str) else value


def _table_from_type(value: Any) -> Any:
    return {"type": value} if isinstance(value, str) else value


class BackendConfig(Schema):
    url: Annotated[str, AfterValidator(_url)]
    weight: PositiveInt = 1
    backup: bool = False


class AlgorithmConfig(_PluginTable):
    name: str = "round_robin"


class TimeoutsConfig(Schema):
    connect: Duration = DEFAULT_TIMEOUTS["connect"]
    read: Duration = DEFAULT_TIMEOUTS["read"]
    write: Duration = DEFAULT_TIMEOUTS["write"]
    #: A deadline for the response head over every try, back-offs
    #: included (504 when it passes); 0 sets none.
    total: OptionalDuration = 0.0


def _statuses(value: tuple[int, ...]) -> tuple[int, ...]:
    for status in value:
        if not 200 <= status <= 599:
            raise ValueError(f"must list statuses from 200 to 599, got {status!r}")
    return tuple(sorted(set(value)))


def _tuple_from_list(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


StatusList = Annotated[
    tuple[int, ...], BeforeValidator(_tuple_from_list), AfterValidator(_statuses)
]


class RetriesConfig(Schema):
    attempts: PositiveInt = DEFAULT_RETRIES["attempts"]
    budget_percent: Percent = DEFAULT_RETRIES["budget_percent"]
    #: Statuses retried like a failure before any response byte.
    on_status: StatusList = ()
    #: Full-jitter exponential back-off: before the n-th retry a random
    #: wait in [0, min(max_backoff, backoff x 2^(n-1))].
    backoff: OptionalDuration = 0.025
    max_backoff: OptionalDuration = 0.25


class HealthCheckConfig(_PluginTable):
    """``type`` and the scheduler's keys; the rest go to the check plugin."""

    type: str = "none"
    interval: Duration = 5.0
    rise: PositiveInt = 2
    fall: PositiveInt = 3


def _positive_number(value: float) -> float:
    if not value > 0:
        raise ValueError(f"must be a positive number, got {value!r}")
    return value


class SuccessRateConfig(Schema):
    """Envoy's success-rate detection: every ``interval`` seconds, among the
    backends with ``request_volume`` answers or more in it (when there are
    ``minimum_hosts`` of them), eject those whose success rate is below the
    mean by more than ``stdev_factor`` standard deviations."""

    stdev_factor: Annotated[float, AfterValidator(_positive_number)] = 1.9
    minimum_hosts: PositiveInt = 5
    request_volume: PositiveInt = 100
    interval: Duration = 10.0


class FailurePercentageConfig(Schema):
    """Envoy's failure-percentage detection: as success rate, but eject the
    backends whose share of failures is ``threshold`` percent or more."""

    threshold: Percent = 85
    minimum_hosts: PositiveInt = 5
    request_volume: PositiveInt = 50
    interval: Duration = 10.0


STATUS_RANGES_FORM = "statuses and ranges such as '500-599' or '502-504,429'"


_STATUS_ITEM = re.compile(r"\s*([0-9]{3})\s*(?:-\s*([0-9]{3})\s*)?")


def _status_set(value: Any) -> Any:
    # "502-504,429" -> frozenset({429, 502, 503, 504}), once, at load; a
    # frozenset (a config built in Python) is taken as it is.
    if isinstance(value, frozenset):
        return value
    if not isinstance(value, str):
        raise ValueError(f"must be a string of {STATUS_RANGES_FORM}, got {value!r}")
    statuses: set[int] = set()
    for item in value.split(","):
        match = _STATUS_ITEM.fullmatch(item)
        if match is None:
            raise ValueError(f"must be {STATUS_RANGES_FORM}, got {value!r}")
        first = int(match[1])
        last = first if match[2] is None else int(match[2])
        if not 200 <= first <= last <= 599:
            raise ValueError(
                f"must name statuses from 200 to 599, ranges low to high, got {item.strip()!r}"
            )
        statuses.update(range(first, last + 1))
    return frozenset(statuses)


def _status_ranges(statuses: frozenset[int]) -> str:
    # The inverse of _status_set: frozenset({429, 502, 503, 504}) -> "429,502-504".
    parts: list[str] = []
    ordered = sorted(statuses)
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        parts.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(parts)


StatusSet = Annotated[
    frozenset[int], BeforeValidator(_status_set), PlainSerializer(_status_ranges, return_type=str)
]


class HedgeConfig(Schema):
    """``hedge = { after, max }``: more tries for a slow idempotent request."""

    #: Seconds without a response head before a hedged try starts.
    after: Duration = 0.05
    #: At most this many hedged tries per request.
    max: PositiveInt = 1


class AdaptiveConcurrencyConfig(Schema):
    """``adaptive_concurrency``: a pool limit on requests in flight, from latency."""

    min_limit: PositiveInt = 4
    max_limit: PositiveInt = 1000
    #: Seconds between two re-samplings of the limit.
    window: Duration = 1.0

    @field_validator("max_limit")
    @classmethod
    def _not_below_min(cls, value: int, info: ValidationInfo) -> int:
        low = info.data.get("min_limit")
        if low is not None and value < low:
            raise ValueError(f"must be at least min_limit ({low}), got {value}")
        return value


class OutlierDetectionConfig(Schema):
    consecutive_failures: PositiveInt = 5
    base_ejection_time: Duration = 30.0
    max_ejection_time: Duration = 300.0
    max_ejection_percent: Percent = 50
    #: Rate-based ejection, as Envoy's; each off unless its table is given.
    success_rate: SuccessRateConfig | None = None
    failure_percentage: FailurePercentageConfig | None = None
    #: Answers that count against their backend (connection errors and
    #: timeouts always do): a string such as "500-599" or "502-504,429".
    failure_statuses: StatusSet = frozenset(range(500, 600))


class PersistenceConfig(_PluginTable):
    type: str


class DiscoveryConfig(_PluginTable):
    """``type`` and ``interval``; the rest go to the discovery plugin."""

    type: str
    #: Seconds between resolutions; None: the plugin's own default.
    interval: Duration | None = None


def _file_name(value: str) -> str:
    if not value.strip():
        raise ValueError("must name a file, got ''")
    return value


def _server_name(value: str) -> str:
    name = value.lower()
    try:
        ipaddress.ip_address(name)
        return name  # verified as an IP address; no SNI is sent for one
    except ValueError:
        pass
    labels = name.split(".")
    if not name or not all(_LABEL.fullmatch(label) for label in labels):
        raise ValueError(
            f"must be a host name such as 'api.internal' (no port, no wildcard), got {value!r}"
        )
    return name


FileName = Annotated[str, AfterValidator(_file_name)]


class TLSConfig(Schema):
    """A pool's TLS to its ``https://`` backends (see balancekit._upstream_tls)."""

    #: PEM CA bundle that replaces the system's CAs.
    ca: FileName | None = None
    #: PEM client certificate (chain), presented to every backend (mTLS).
    cert: FileName | None = None
    #: Its PEM private key, unencrypted; may be left out when ``cert`` holds it.
    key: FileName | None = None
    #: The name sent as SNI and verified, instead of each backend's host.
    server_name: Annotated[str, AfterValidator(_server_name)] | None = None
    verify: bool = True


class PoolConfig(Schema):
    algorithm: Annotated[AlgorithmConfig, BeforeValidator(_table_from_name)] = AlgorithmConfig()
    backends: list[Annotated[BackendConfig, BeforeValidator(_table_from_url)]] = Field(
        default_factory=list
    )
    preserve_host: bool = False
    max_connections: PositiveInt = 1024
    #: Requests that may wait, first come first served, for a backend when
    #: every eligible one is at max_connections; each for queue_timeout.
    max_pending: NonNegativeInt = 0
    queue_timeout: Duration = 1.0
    #: A request body up to this many bytes is read whole before a backend
    #: is picked (a slow client then holds no backend); 0 streams every body.
    request_buffer: NonNegativeInt = 0
    panic_threshold: Percent = 50
    slow_start: OptionalDuration = 0.0
    timeouts: TimeoutsConfig = TimeoutsConfig()
    retries: RetriesConfig = RetriesConfig()
    health_check: Annotated[HealthCheckConfig, BeforeValidator(_table_from_type)] = (
        HealthCheckConfig()
    )
    outlier_detection: OutlierDetectionConfig | None = None
    persistence: Annotated[PersistenceConfig | None, BeforeValidator(_table_from_type)] = None
    tls: TLSConfig | None = None
    #: Hedged requests (off by default; the async engine and serve).
    hedge: HedgeConfig | None = None
    #: A limit on the pool's requests in flight that follows latency (off by default).
    adaptive_concurrency: AdaptiveConcurrencyConfig | None = None
    #: Where more backends come from (balancekit.discovery), beside ``backends``.
    discovery: Annotated[DiscoveryConfig | None, BeforeValidator(_table_from_type)] = None

    @field_validator("backends")
    @classmethod
    def _unique_urls(cls, backends: list[BackendConfig]) -> list[BackendConfig]:
        seen: set[str] = set()
        for backend in backends:
            if backend.url in seen:
                raise ValueError(f"lists {backend.url!r} twice")
            seen.add(backend.url)
        return backends


def _prefix(value: str) -> str:
    if not value.startswith("/"):
        raise ValueError(f"must start with '/', got {value!r}")
    return value


#: Methods a route may name (RFC 9110 section 9, and PATCH).
METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")

_LABEL = re.compile(r"[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 section 5.6.2
SPLIT_KEY_FORMS = "'ip', 'header:NAME', 'cookie:NAME' or 'query:NAME'"


def _route_host(value: str) -> str:
    host = value.lower()
    if ":" in host:
        raise ValueError(f"must be a host name without a port, got {value!r}")
    name = host.removeprefix("*.")
    labels = name.split(".")
    if not name or not all(_LABEL.fullmatch(label) for label in labels):
        hint = " (a wildcard is '*.' before a domain)" if "*" in host else ""
        raise ValueError(f"must be a host name such as 'api.example.com'{hint}, got {value!r}")
    return host


def _methods(value: list[str]) -> list[str]:
    for method in value:
        if method not in METHODS:
            hint = (
                f"; did you mean {method.upper()!r}?"
                if method.upper() in METHODS
                else did_you_mean(method, METHODS)
            )
            raise ValueError(f"unknown method {method!r}{hint}")
    if not value:
        raise ValueError("must name at least one method (leave it out to match every method)")
    return value


def _header_names(value: dict[str, str]) -> dict[str, str]:
    for name in value:
        if not _TOKEN.fullmatch(name):
            raise ValueError(f"{name!r} is not a header name")
    return value


def _split(value: dict[str, int]) -> dict[str, int]:
    if not value:
        raise ValueError("must name at least one pool")
    for name, share in value.items():
        if not 0 <= share <= 100:
            raise ValueError(f"{name}: must be a percentage from 0 to 100, got {share!r}")
    total = sum(value.values())
    if total != 100:
        raise ValueError(f"percentages add up to {total}, not 100")
    return value


def _split_key(value: str) -> str:
    kind, _, name = value.partition(":")
    if value != "ip" and not (kind in ("header", "cookie", "query") and name):
        raise ValueError(f"must be {SPLIT_KEY_FORMS}, got {value!r}")
    return value


class RouteTimeouts(Schema):
    """A route's own timeouts: each key given replaces the pool's."""

    connect: Duration | None = None
    read: Duration | None = None
    write: Duration | None = None
    total: OptionalDuration | None = None


class RouteRetries(Schema):
    """A route's own retry terms: each key given replaces the pool's."""

    attempts: PositiveInt | None = None
    budget_percent: Percent | None = None
    on_status: StatusList | None = None
    backoff: OptionalDuration | None = None
    max_backoff: OptionalDuration | None = None


class RouteConfig(Schema):
    prefix: Annotated[str, AfterValidator(_prefix)]
    host: Annotated[str, AfterValidator(_route_host)] | None = None
    methods: Annotated[list[str], AfterValidator(_methods)] | None = None
    headers: Annotated[dict[str, str], AfterValidator(_header_names)] | None = None
    pool: str | None = None
    split: Annotated[dict[str, int], AfterValidator(_split)] | None = None
    split_key: Annotated[str, AfterValidator(_split_key)] | None = None
    strip_prefix: bool = False
    rewrite: Annotated[str, AfterValidator(_prefix)] | None = None
    timeouts: RouteTimeouts | None = None
    retries: RouteRetries | None = None

    @property
    def pools(self) -> list[str]:
        """Every pool the route sends to."""
        if self.split is not None:
            return list(self.split)
        return [] if self.pool is None else [self.pool]


def _status_path(value: str) -> str:
    _prefix(value)
    return value if value.endswith("/") else value + "/"


def _port_number(value: int) -> int:
    if not 0 <= value <= 65535:
        raise ValueError(f"must be a port from 0 to 65535, got {value!r}")
    return value


class ServeConfig(Schema):
    """``balancekit serve``'s own settings; its command-line flags win."""

    host: str = "127.0.0.1"
    port: Annotated[int, AfterValidator(_port_number)] = 8000
    #: Above 1 needs a shared store; ``balancekit serve`` says so at start-up.
    workers: PositiveInt = 1
    certfile: str | None = None
    keyfile: str | None = None
    proxy_protocol: bool = False


class StatusConfig(Schema):
    enabled: bool = False
    path: Annotated[str, AfterValidator(_status_path)] = "/balancekit/"
    token: str = ""
    allow: CIDRList = ()


class AdminConfig(Schema):
    """The admin HTTP API (``balancekit.admin``): runtime changes over HTTP."""

    enabled: bool = False
    path: Annotated[str, AfterValidator(_status_path)] = "/balancekit/api/"
    #: Bearer token every request must carry; required when enabled.
    token: str = Field("", validate_default=True)
    allow: CIDRList = ()

    @field_validator("token")
    @classmethod
    def _token_when_enabled(cls, value: str, info: ValidationInfo) -> str:
        if info.data.get("enabled") and not value:
            raise ValueError("required when the admin API is enabled (it changes what is served)")
        return value


#: Headers balancekit itself writes or drops: a request id cannot be one.
_NOT_A_REQUEST_ID = frozenset(
    {
        "host",
        "connection",
        "keep-alive",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
    }
)


def _request_id(value: str) -> str:
    if not value:
        return value  # off
    if not _TOKEN.fullmatch(value):
        raise ValueError(f'must be a header name (or "" for none), got {value!r}')
    if value.lower() in _NOT_A_REQUEST_ID:
        raise ValueError(f"{value!r} is a header balancekit sets itself; name another")
    return value


def _access_log(value: Any) -> bool | str:
    if value is True or value is False or value == "json":
        return value  # type: ignore[no-any-return]
    raise ValueError(f'must be true, false or "json", got {value!r}')


def _tracing(value: bool) -> bool:
    if value:
        try:
            import opentelemetry.trace  # noqa: F401  (loaded only when asked for)
        except ImportError:
            raise ValueError(
                "needs OpenTelemetry's API: pip install 'balancekit[otel]' (the otel extra)"
            ) from None
    return value


def _secrets(value: Any) -> Any:
    if isinstance(value, list) and not value:
        raise ValueError("must be a string or a non-empty list of strings, got []")
    return value


class BalancerConfig(Schema):
    """The whole configuration, validated. Build it with :func:`load_config`."""

    secret: Annotated[str | list[str] | None, BeforeValidator(_secrets)] = None
    store: str = "memory://"
    trusted_proxies: CIDRList = ()
    transport: str = "httptools"
    #: True: one text line per proxied request; "json": one JSON object.
    access_log: Annotated[bool | Literal["json"], PlainValidator(_access_log)] = False
    #: The header that carries a request's id upstream and back ("" for none).
    request_id: Annotated[str, AfterValidator(_request_id)] = "X-Request-ID"
    #: A CLIENT span per try, through OpenTelemetry's global tracer provider.
    tracing: Annotated[bool, AfterValidator(_tracing)] = False
    pools: dict[str, PoolConfig] = Field(default_factory=dict)
    routes: list[RouteConfig] = Field(default_factory=list)
    status: StatusConfig = StatusConfig()
    admin: AdminConfig = AdminConfig()
    serve: ServeConfig = ServeConfig()

    @field_validator("transport")
    @classmethod
    def _known_transport(cls, value: str) -> str:
        if value not in TRANSPORTS:
            raise ValueError(f"must be one of {', '.join(map(repr, TRANSPORTS))}, got {value!r}")
        return value

    @property
    def secrets(self) -> list[str]:
        """The signing secrets: the first signs, all verify."""
        if self.secret is None:
            return []
        return [self.secret] if isinstance(self.secret, str) else list(self.secret)


# --- turning pydantic's errors into ours -------------------------------------

# For "did you mean": how to step from a model into its children.
_CHILDREN: dict[type[BaseModel], dict[str, tuple[str, type[BaseModel]]]] = {
    BalancerConfig: {
        "pools": ("dict", PoolConfig),
        "routes": ("list", RouteConfig),
        "status": ("one", StatusConfig),
        "admin": ("one", AdminConfig),
        "serve": ("one", ServeConfig),
    },
    RouteConfig: {
        "timeouts": ("one", RouteTimeouts),
        "retries": ("one", RouteRetries),
    },
    PoolConfig: {
        "backends": ("list", BackendConfig),
        "timeouts": ("one", TimeoutsConfig),
        "retries": ("one", RetriesConfig),
        "outlier_detection": ("one", OutlierDetectionConfig),
        "tls": ("one", TLSConfig),
        "hedge": ("one", HedgeConfig),
        "adaptive_concurrency": ("one", AdaptiveConcurrencyConfig),
    },
}

_TYPE_NAMES = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
    "string_type": "a string",
    "list_type": "a list",
    "tuple_type": "a list",
    "dict_type": "a table",
    "model_type": "a table",
    "model_attributes_type": "a table",
}


def format_path(loc: tuple[int | str, ...]) -> str:
    """``("pools", "api", "backends", 1, "weight")`` -> ``pools.api.backends[1].weight``."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path


def did_you_mean(key: str, candidates: list[str] | tuple[str, ...]) -> str:
    """``"; did you mean 'x'?"`` when a candidate is close, else ``""``."""
    close = difflib.get_close_matches(key, list(candidates), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _fields_at(loc: tuple[int | str, ...], model: type[BaseModel]) -> list[str]:
    parts = list(loc)
    while parts:
        step = _CHILDREN.get(model, {}).get(str(parts.pop(0)))
        if step is None:
            return []
        kind, model = step
        if kind != "one" and parts:
            parts.pop(0)
    return list(model.model_fields)


def _problem(error: Any, root: type[BaseModel] = BalancerConfig) -> Problem:
    loc = tuple(part for part in error["loc"] if not _is_union_tag(part))
    kind = error["type"]
    value = error.get("input")
    if kind == "extra_forbidden":
        hint = did_you_mean(str(loc[-1]), _fields_at(loc[:-1], root))
        return Problem(format_path(loc), f"unknown key{hint}")
    if kind == "missing":
        return Problem(format_path(loc), "is required")
    if kind == "value_error":
        message = str(error["msg"]).removeprefix("Value error, ")
        return Problem(format_path(loc), message)
    if kind in _TYPE_NAMES:
        return Problem(format_path(loc), f"must be {_TYPE_NAMES[kind]}, got {value!r}")
    return Problem(format_path(loc), f"{error['msg'][:1].lower()}{error['msg'][1:]}, got {value!r}")


def _is_union_tag(part: int | str) -> bool:
    # pydantic puts the member type of a union into the location
    return isinstance(part, str) and (
        part in ("str", "list[str]", "none") or part.startswith(("function-", "tuple["))
    )


def _merge(problems: list[Problem]) -> list[Problem]:
    # A union (``secret``: a string or a list) fails once per member type;
    # say it once: "must be a string or a list, got 3".
    out: list[Problem] = []
    for problem in problems:
        before = out[-1] if out else None
        if before is not None and before.path == problem.path:
            first, _, got = before.message.partition(", got ")
            second = problem.message.partition(", got ")[0]
            if got and first.startswith("must be ") and second.startswith("must be "):
                message = f"{first} or {second.removeprefix('must be ')}, got {got}"
                out[-1] = Problem(problem.path, message)
                continue
        out.append(problem)
    return out


def _cross_checks(config: BalancerConfig) -> list[Problem]:
    problems = []
    pool_names = list(config.pools)
    for i, route in enumerate(config.routes):
        at = f"routes[{i}]"
        if (route.pool is None) == (route.split is None):
            problems.append(Problem(at, "needs exactly one of 'pool' and 'split'"))
        if route.pool is not None and route.pool not in config.pools:
            hint = did_you_mean(route.pool, pool_names)
            problems.append(Problem(f"{at}.pool", f"unknown pool {route.pool!r}{hint}"))
        for name in route.split or ():
            if name not in config.pools:
                hint = did_you_mean(name, pool_names)
                problems.append(Problem(f"{at}.split.{name}", f"unknown pool {name!r}{hint}"))
        if route.split_key is not None and route.split is None:
            problems.append(Problem(f"{at}.split_key", "applies only to a route with 'split'"))
        if route.rewrite is not None and route.strip_prefix:
            problems.append(
                Problem(
                    f"{at}.rewrite", "excludes 'strip_prefix': the prefix is replaced either way"
                )
            )
    if (config.serve.certfile is None) != (config.serve.keyfile is None):
        problems.append(Problem("serve", "'certfile' and 'keyfile' go together"))
    for name, pool in config.pools.items():
        if pool.tls is not None:
            problems += _tls_checks(f"pools.{name}.tls", pool.tls)
        if (
            pool.persistence is not None
            and pool.persistence.type == "cookie"
            and not config.secrets
        ):
            problems.append(
                Problem(
                    f"pools.{name}.persistence",
                    "cookie persistence signs its cookies: set the top-level 'secret'",
                )
            )
    return problems


def _tls_checks(at: str, tls: TLSConfig) -> list[Problem]:
    problems = []
    if tls.key is not None and tls.cert is None:
        problems.append(
            Problem(f"{at}.key", "needs 'cert': a key goes with the client certificate it signs")
        )
    if tls.ca is not None and not tls.verify:
        problems.append(
            Problem(f"{at}.ca", "is never used with verify = false (nothing is verified)")
        )
    return problems


def load_config(
    source: Mapping[str, Any] | str | os.PathLike[str] | BalancerConfig,
) -> BalancerConfig:
    """Validate a configuration from a dict, a TOML file path or a parsed config.

    Raises :class:`ConfigError` listing every problem, each with its key path.
    """
    if isinstance(source, BalancerConfig):
        return source
    if isinstance(source, str | os.PathLike):
        source = _read_toml(Path(source))
    if not isinstance(source, Mapping):
        raise ConfigError(
            f"configuration must be a dict, a TOML file path or a BalancerConfig, got {source!r}"
        )
    config = validate(BalancerConfig, source)
    problems = _cross_checks(config)
    if problems:
        raise ConfigError(problems)
    return config


def validate(model: type[M], data: Mapping[str, Any]) -> M:
    """``data`` as ``model`` (one of these schemas, or another built on
    ``Schema`` such as the simulator's scenario file), or a
    :class:`ConfigError` listing every problem with its key path."""
    try:
        return model.model_validate(dict(data))
    except ValidationError as exc:
        raise ConfigError(_merge([_problem(e, model) for e in exc.errors()])) from None


def nest(model: type[BaseModel], **children: tuple[str, type[BaseModel]]) -> None:
    """Say how ``model`` steps into its child models (``"one"``, ``"list"``
    or ``"dict"`` of which model), so an unknown key deep inside gets its
    "did you mean"."""
    _CHILDREN[model] = dict(children)


def with_default_secret(
    source: Mapping[str, Any] | str | os.PathLike[str] | BalancerConfig, secret: str | None
) -> Mapping[str, Any] | BalancerConfig:
    """``source`` with ``secret`` filled in when it sets none (the frameworks'
    SECRET_KEY); a TOML path is read here, so its errors still name the file."""
    if isinstance(source, str | os.PathLike):
        source = _read_toml(Path(source))
    if not secret:
        return source
    if isinstance(source, BalancerConfig):
        return source if source.secret is not None else source.model_copy(update={"secret": secret})
    if source.get("secret") is not None:
        return source
    return {**source, "secret": secret}


def validate_backend(url: str, weight: int = 1, *, backup: bool = False) -> BackendConfig:
    """Check a backend added at run time as the config would; ConfigError if bad."""
    try:
        return BackendConfig(url=url, weight=weight, backup=backup)
    except ValidationError as exc:
        raise ConfigError([_problem(error) for error in exc.errors()]) from None


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such configuration file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read: {exc.strerror}") from None
    _beside(data, path.parent)
    return data


#: A pool's ``tls`` keys that name files.
TLS_FILES = ("ca", "cert", "key")


def _beside(data: dict[str, Any], directory: Path) -> None:
    """Make the relative file names of a TOML file's pools' ``tls`` tables
    relative to the file's directory, as ``[serve] certfile`` is (a dict
    config's stay relative to the working directory). Anything that is not
    the expected shape is left for validation to name."""
    pools = data.get("pools")
    if not isinstance(pools, dict):
        return
    for pool in pools.values():
        _discovery_file_beside(pool, directory)
        tls = pool.get("tls") if isinstance(pool, dict) else None
        if not isinstance(tls, dict):
            continue
        for key in TLS_FILES:
            value = tls.get(key)
            if isinstance(value, str) and value.strip():
                tls[key] = str(directory / value)


def _discovery_file_beside(pool: Any, directory: Path) -> None:
    # A file-discovery ``path`` is relative to the TOML file too.
    discovery = pool.get("discovery") if isinstance(pool, dict) else None
    if not isinstance(discovery, dict) or discovery.get("type") != "file":
        return
    path = discovery.get("path")
    if isinstance(path, str) and path.strip():
        discovery["path"] = str(directory / path)


#: Constructor arguments the balancer fills in itself, never config keys.
SEAMS = frozenset({"rng", "clock", "pool", "secrets", "store"})


def plugin_options(path: str, cls: type, options: Mapping[str, Any]) -> list[Problem]:
    """Check a plugin table's keys against its class's keyword arguments.

    The constructor's signature is the schema: an unknown key is a problem
    with its path, before the constructor could fail with a ``TypeError``.
    """
    import inspect

    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return []
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return []
    accepted = [
        n
        for n, p in params.items()
        if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        and n not in SEAMS
    ]
    problems = [
        Problem(f"{path}.{key}", f"unknown key{did_you_mean(key, accepted)}")
        for key in options
        if key not in accepted
    ]
    required = [
        n
        for n, p in params.items()
        if p.default is inspect.Parameter.empty
        and p.kind is inspect.Parameter.KEYWORD_ONLY
        and n not in options
        and n not in SEAMS
    ]
    problems += [Problem(f"{path}.{n}", "is required") for n in required]
    return problems
