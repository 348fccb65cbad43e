"""Request keys for the hashing algorithms, and a hash that every process shares.

Python's ``hash()`` is salted per process, so two workers would map one key
to different backends; blake2b is stable everywhere.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable
from urllib.parse import parse_qs

from .._request import RequestInfo

KeyFunction = Callable[[RequestInfo], str | None]

KEY_FORMS = "'ip', 'path', 'header:NAME', 'cookie:NAME' or 'query:NAME'"


@functools.lru_cache(maxsize=8192)
def stable_hash(text: str) -> int:
    """A 64-bit hash of ``text``, the same in every process and on every host.

    Cached: client addresses and session keys repeat, and a cache hit costs
    a fifth of a blake2b digest.
    """
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def key_function(spec: str) -> KeyFunction:
    """The function reading ``spec``'s key from a request; ValueError if unknown.

    A request without the key gives None: the algorithm then falls back to
    an even spread instead of hashing "" onto a single backend.
    """
    kind, _, name = spec.partition(":")
    if spec == "ip":
        return lambda request: request.client_ip or None
    if spec == "path":
        return lambda request: request.path
    if kind == "header" and name:
        return lambda request: request.header(name)
    if kind == "cookie" and name:
        return lambda request: request.cookies.get(name)
    if kind == "query" and name:
        return lambda request: parse_qs(request.query).get(name, [None])[0]
    raise ValueError(f"key: must be {KEY_FORMS}, got {spec!r}")
