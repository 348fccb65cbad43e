"""The admin HTTP API (CONTRACT section 13): the runtime control of
:class:`~balancekit.Pool` over HTTP, for ``balancekit ctl`` and scripts.

Off unless ``[admin] enabled``; every request needs ``Authorization: Bearer
<token>`` (no query token: a link must not be able to change anything),
and ``allow`` narrows who may ask. It is plain request-in, answer-out with
no I/O of its own, so every adapter serves it the same way: the ASGI and
WSGI middleware and the Django app hand it the method, the raw path, the
headers and the body, and send back what :meth:`AdminEndpoint.respond`
returns. Changes go through the pools' own methods, so a shared store
carries them to every worker and host as it carries any runtime change.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from ._exceptions import ConfigError, PluginError
from ._forwarding import TrustedProxies
from ._problem import Answer, problem

if TYPE_CHECKING:
    from ._balancer import Balancer
    from ._pool import Pool
    from ._types import RawHeaders

#: A request body larger than this is refused (a backend is a few fields).
MAX_BODY = 64 * 1024

#: The actions on one backend, ``POST .../backends/{url}/{action}``.
_ACTIONS = {"drain": "drain", "disable": "disable", "enable": "enable"}


class AdminError(Exception):
    """An answer other than success: status, detail, and extra headers."""

    def __init__(self, status: int, detail: str, *headers: tuple[bytes, bytes]) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = list(headers)


def _not_allowed(*methods: str) -> AdminError:
    allow = ", ".join(methods).encode()
    return AdminError(405, f"only {', '.join(methods)} here", (b"allow", allow))


class AdminEndpoint:
    """Serves the admin API under ``[admin] path``."""

    def __init__(self, balancer: Balancer) -> None:
        config = balancer.config.admin
        self.balancer = balancer
        self.path = config.path
        self.token = config.token.encode()
        self.allow = TrustedProxies(config.allow) if config.allow else None
        #: Called after ``POST reload`` applied a file: under ``serve
        #: --workers``, it tells the supervisor, which reloads every worker.
        self.after_reload: Callable[[], None] | None = None

    def matches(self, path: str) -> bool:
        return path.startswith(self.path) or path == self.path[:-1]

    def respond(
        self, method: str, raw_path: str, client_ip: str, headers: RawHeaders, body: bytes
    ) -> Answer:
        """Status, headers and body for a request under the admin path.

        ``raw_path`` is the path as sent, percent-encoding intact: a
        backend's URL is one encoded segment, and decoding first would
        split it.
        """
        try:
            status, answer = self._dispatch(method, raw_path, client_ip, headers, body)
        except AdminError as error:
            code, answer_headers, payload = problem(error.status, error.detail)
            return code, [*answer_headers, *error.headers], payload
        payload = json.dumps(answer).encode()
        return (
            status,
            [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                (b"cache-control", b"no-store"),
            ],
            payload,
        )

    # --- the table of section 13 ----------------------------------------------------

    def _dispatch(
        self, method: str, raw_path: str, client_ip: str, headers: RawHeaders, body: bytes
    ) -> tuple[int, Any]:
        if self.allow is not None and client_ip not in self.allow:
            raise AdminError(403, "this client's address is not in [admin] allow")
        self._authorize(headers)
        rest = raw_path[len(self.path) :] if raw_path.startswith(self.path) else ""
        parts = [unquote(part) for part in rest.split("/")] if rest else []
        if parts == ["pools"]:
            if method != "GET":
                raise _not_allowed("GET")
            return 200, self.balancer.status()["pools"]
        if parts == ["reload"]:
            if method != "POST":
                raise _not_allowed("POST")
            return 200, self._reload()
        if len(parts) >= 3 and parts[0] == "pools" and parts[2] == "backends":
            pool = self._pool(parts[1])
            return self._backends(method, pool, parts[3:], body)
        raise AdminError(404, f"no such admin resource: {raw_path!r}")

    def _backends(self, method: str, pool: Pool, parts: list[str], body: bytes) -> tuple[int, Any]:
        if not parts:  # .../backends
            if method != "POST":
                raise _not_allowed("POST")
            fields = _json_object(body, ("url", "weight", "backup"))
            url = _field(fields, "url", str)
            weight = _field(fields, "weight", int, 1)
            backup = _field(fields, "backup", bool, False)
            if pool.find(url) is not None:
                raise AdminError(409, f"url: pool {pool.name!r} already has backend {url!r}")
            try:
                backend = pool.add_backend(url, weight, backup=backup)
            except (ValueError, ConfigError) as exc:
                raise AdminError(400, f"url: {exc}") from None
            return 201, backend.as_status()
        url = parts[0]
        if pool.find(url) is None:
            raise AdminError(404, f"pool {pool.name!r} has no backend {url!r}")
        if len(parts) == 1:  # .../backends/{url}
            if method != "DELETE":
                raise _not_allowed("DELETE")
            pool.remove_backend(url)
            return 202, {"url": url, "removed": True}
        if len(parts) == 2 and parts[1] in _ACTIONS:
            if method != "POST":
                raise _not_allowed("POST")
            getattr(pool, _ACTIONS[parts[1]])(url)
            return 200, pool.backend(url).as_status()
        if len(parts) == 2 and parts[1] == "weight":
            if method != "PUT":
                raise _not_allowed("PUT")
            weight = _field(_json_object(body, ("weight",)), "weight", int)
            try:
                pool.set_weight(url, weight)
            except (ValueError, ConfigError) as exc:
                raise AdminError(400, f"weight: {exc}") from None
            return 200, pool.backend(url).as_status()
        raise AdminError(404, f"no such action on a backend: {'/'.join(parts[1:])!r}")

    def _authorize(self, headers: RawHeaders) -> None:
        for name, value in headers:
            if name.lower() == b"authorization":
                scheme, _, supplied = value.partition(b" ")
                if scheme.lower() == b"bearer" and hmac.compare_digest(
                    supplied.strip(), self.token
                ):
                    return
                break
        raise AdminError(
            401, "needs Authorization: Bearer <[admin] token>", (b"www-authenticate", b"Bearer")
        )

    def _pool(self, name: str) -> Pool:
        pool = self.balancer.pools.get(name)
        if pool is None:
            raise AdminError(404, f"no such pool: {name!r}")
        return pool

    def _reload(self) -> dict[str, bool]:
        path = self.balancer.config_path
        if path is None:
            raise AdminError(409, "this balancer was not started from a configuration file")
        try:
            self.balancer.reload(path)
        except (ConfigError, PluginError) as exc:
            raise AdminError(400, f"the running configuration stays: {exc}") from None
        if self.after_reload is not None:
            self.after_reload()
        return {"reloaded": True}


def _json_object(body: bytes, known: tuple[str, ...]) -> dict[str, Any]:
    """The body as a JSON object with only ``known`` fields, or a 400."""
    if len(body) > MAX_BODY:
        raise AdminError(400, f"the body is over {MAX_BODY} bytes")
    try:
        fields = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise AdminError(400, "the body must be a JSON object") from None
    if not isinstance(fields, dict):
        raise AdminError(400, "the body must be a JSON object")
    unknown = sorted(set(fields) - set(known))
    if unknown:
        raise AdminError(400, f"{unknown[0]}: unknown field (known: {', '.join(known)})")
    return fields


_MISSING: Any = object()
_KINDS = {str: "a string", int: "an integer", bool: "true or false"}


def _field(fields: dict[str, Any], name: str, kind: type[Any], default: Any = _MISSING) -> Any:
    """``fields[name]`` when it is of ``kind`` (bool is not an int here)."""
    if name not in fields:
        if default is _MISSING:
            raise AdminError(400, f"{name}: required")
        return default
    value = fields[name]
    if type(value) is not kind:
        raise AdminError(400, f"{name}: must be {_KINDS[kind]}, got {value!r}")
    return value


__all__ = ["MAX_BODY", "AdminEndpoint"]
