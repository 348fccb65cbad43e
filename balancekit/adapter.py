"""What a framework adapter builds on: the public names balancekit's own
adapters use, so that an adapter (Django's, Flask's, yours) never imports a
private module.

An adapter turns its framework's request into the arguments of
:meth:`balancekit.Balancer.classify` and acts on the verdict::

    verdict = balancer.classify(method, raw_path, headers, query=..., client_ip=...)
    if isinstance(verdict, Routed):   # proxy it with an engine
        ...
    elif isinstance(verdict, Refuse): # answer verdict.status, .headers, .body
        ...
    elif isinstance(verdict, Status): # balancer.status_endpoint serves verdict.path
        ...
    elif isinstance(verdict, Admin):  # balancer.admin_endpoint.respond(method,
        ...                           #   verdict.raw_path, client_ip, headers, body)
    else:                             # PASS: the framework has it
        ...

A WSGI adapter gets the arguments from an environ with
:func:`balancekit.wsgi.classify_environ`, and proxies a ``Routed`` with
``balancer.sync_engine().handle(verdict, environ, start_response)``; an
ASGI one with ``await balancer.engine().handle(verdict, scope, receive, send)``.
"""

from __future__ import annotations

from ._balancer import ConfigInput
from ._changes import Change, Op, toward_flags
from ._classify import PASS, Admin, Classification, Pass, Refuse, Routed, Status
from ._config import validate_backend, with_default_secret
from ._exceptions import Problem
from ._routing import Route, route_from_config

__all__ = [
    "PASS",
    "Admin",
    "Change",
    "Classification",
    "ConfigInput",
    "Op",
    "Pass",
    "Problem",
    "Refuse",
    "Route",
    "Routed",
    "Status",
    "route_from_config",
    "toward_flags",
    "validate_backend",
    "with_default_secret",
]
