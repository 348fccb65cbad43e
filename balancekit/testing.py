"""Helpers for plugin authors' own test suites.

::

    from balancekit.testing import check_algorithm
    from my_plugin import Canary


    def test_canary_keeps_the_algorithm_contract():
        check_algorithm(Canary, header="X-Beta")

``check_algorithm`` raises :class:`AlgorithmCheckFailed`, listing in plain
words every rule the class broke; ``check_discovery(cls, **options)`` does
the same for a discovery class (:class:`DiscoveryCheckFailed`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import threading
from collections.abc import Sequence
from typing import Any

from ._backend import Backend
from ._request import RequestInfo
from .discovery._runner import parse_answer

__all__ = [
    "AlgorithmCheckFailed",
    "DiscoveryCheckFailed",
    "check_algorithm",
    "check_discovery",
    "make_backends",
    "make_request",
]


class AlgorithmCheckFailed(AssertionError):
    """An algorithm class broke the plugin contract; ``problems`` says how."""

    def __init__(self, name: str, problems: list[str]) -> None:
        self.problems = problems
        lines = "\n".join(f"- {p}" for p in problems)
        super().__init__(f"algorithm {name} breaks the balancekit contract:\n{lines}")


def make_backends(count: int, *, weights: Sequence[int] | None = None) -> list[Backend]:
    """``count`` backends on made-up loopback addresses (an algorithm that
    probes its backends, as ``prequal`` does, reaches nothing beyond this
    host), with ``weights`` if given."""
    weights = weights or [1] * count
    return [Backend(f"http://127.99.0.{i + 1}:8080", weights[i]) for i in range(count)]


def make_request(
    path: str = "/",
    *,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    client_ip: str = "192.0.2.1",
    query: str = "",
) -> RequestInfo:
    """A request as algorithms see it."""
    raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    return RequestInfo(method, path, query=query, headers=raw, client_ip=client_ip)


def _requests() -> list[RequestInfo]:
    return [
        make_request(
            f"/item/{i}",
            headers={"X-User": f"u{i}", "Cookie": f"sid=s{i}"},
            client_ip=f"192.0.2.{i % 250 + 1}",
            query=f"id={i}",
        )  # fmt: skip
        for i in range(40)
    ] + [make_request()]


def check_algorithm(cls: type[Any], **options: Any) -> None:
    """Check ``cls`` against the algorithm contract (CONTRACT section 8).

    - a non-empty ``name`` string;
    - ``options`` are keyword arguments its constructor accepts;
    - ``pick`` returns one of the backends it was given, for one backend and
      for several, with and without the request details it may want;
    - it copes with backends vanishing and joining between calls;
    - it refuses an empty sequence instead of returning something;
    - it gives valid answers when called from several threads under one
      lock, as the pool calls it.
    """
    problems: list[str] = []
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        problems.append("it needs a class attribute 'name', a non-empty string")
    label = repr(name) if isinstance(name, str) and name else cls.__name__
    try:
        params: dict[str, inspect.Parameter] | None = dict(inspect.signature(cls).parameters)
    except (TypeError, ValueError):  # no signature to read: construction will tell
        params = None
    if params is not None and not any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()
    ):
        problems += [f"its constructor takes no option {k!r}" for k in options if k not in params]
    try:
        algorithm = cls(**options)
    except Exception as exc:  # report any construction failure in words
        problems.append(f"it cannot be built with {options!r}: {type(exc).__name__}: {exc}")
        raise AlgorithmCheckFailed(label, problems) from exc
    if not callable(getattr(algorithm, "pick", None)):
        problems.append("it needs a method pick(backends, request)")
        raise AlgorithmCheckFailed(label, problems)

    requests = _requests()
    pool = make_backends(5, weights=[1, 2, 3, 1, 2])
    for size in (1, 2, 5, 3, 1, 4):
        offered = tuple(pool[:size])
        for request in requests:
            _check_pick(algorithm, offered, request, problems, f"{size} backends")
    # a backend vanishes and another joins, between calls
    shifted = (pool[0], pool[2], pool[4])
    for request in requests:
        _check_pick(algorithm, shifted, request, problems, "backends that changed")
    try:
        chosen = algorithm.pick((), requests[0])
    except Exception:  # any exception is the right answer here
        pass
    else:
        problems.append(f"pick() with no backends returned {chosen!r} instead of raising")
    _check_threads(algorithm, pool, requests, problems)
    if problems:
        raise AlgorithmCheckFailed(label, sorted(set(problems)))


def _check_pick(
    algorithm: Any,
    offered: tuple[Backend, ...],
    request: RequestInfo,
    problems: list[str],
    where: str,
) -> None:
    try:
        chosen = algorithm.pick(offered, request)
    except Exception as exc:  # a plugin's bug: report it in words
        problems.append(f"pick() raised {type(exc).__name__}: {exc} (with {where})")
        return
    if not any(chosen is b for b in offered):
        problems.append(f"pick() returned {chosen!r}, which is not one of the {where} it was given")


def _check_threads(
    algorithm: Any, pool: list[Backend], requests: list[RequestInfo], problems: list[str]
) -> None:
    lock = threading.Lock()
    offered = tuple(pool)
    bad: list[str] = []

    def work() -> None:
        for request in requests * 5:
            with lock:  # the pool holds its lock around every pick
                try:
                    chosen = algorithm.pick(offered, request)
                except Exception as exc:  # reported below, in words
                    bad.append(f"{type(exc).__name__}: {exc}")
                    continue
            if not any(chosen is b for b in offered):
                bad.append(f"returned {chosen!r}")

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if bad:
        problems.append(f"pick() from several threads went wrong: {bad[0]}")


class DiscoveryCheckFailed(AssertionError):
    """A discovery class broke the plugin contract; ``problems`` says how."""

    def __init__(self, name: str, problems: list[str]) -> None:
        self.problems = problems
        lines = "\n".join(f"- {p}" for p in problems)
        super().__init__(f"discovery {name} breaks the balancekit contract:\n{lines}")


def check_discovery(cls: type[Any], **options: Any) -> None:
    """Check ``cls`` against the discovery contract (CONTRACT section 12).

    - a non-empty ``name`` string;
    - ``options`` are keyword arguments its constructor accepts;
    - ``resolve`` is an ``async def``, and two calls each return a list of
      URL strings or ``{url, weight, backup}`` tables that are valid
      backends (in an event loop of its own, in another thread, so that the
      check may be called from a test that runs in a loop);
    - ``interval``, if it has one, is a positive number, and ``ttl`` after a
      call is None or a number;
    - ``aclose``, if it has one, is an ``async def``.

    ``options`` must point it at something that answers (a file, a DNS
    server of the test's own): a ``resolve`` that raises is reported.
    """
    problems: list[str] = []
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        problems.append("it needs a class attribute 'name', a non-empty string")
    label = repr(name) if isinstance(name, str) and name else cls.__name__
    problems += _unknown_options(cls, options)
    try:
        instance = cls(**options)
    except Exception as exc:  # report any construction failure in words
        problems.append(f"it cannot be built with {options!r}: {type(exc).__name__}: {exc}")
        raise DiscoveryCheckFailed(label, problems) from exc
    if not inspect.iscoroutinefunction(getattr(instance, "resolve", None)):
        problems.append("it needs a method 'async def resolve(self)'")
        raise DiscoveryCheckFailed(label, problems)
    interval = getattr(instance, "interval", None)
    if interval is not None and not (_is_number(interval) and interval > 0):
        problems.append(f"its 'interval' must be a positive number of seconds, got {interval!r}")
    aclose = getattr(instance, "aclose", None)
    if aclose is not None and not inspect.iscoroutinefunction(aclose):
        problems.append("its 'aclose' must be an 'async def'")
        aclose = None
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        problems += pool.submit(asyncio.run, _check_resolve(instance, aclose)).result()
    if problems:
        raise DiscoveryCheckFailed(label, problems)


async def _check_resolve(instance: Any, aclose: Any) -> list[str]:
    problems: list[str] = []
    try:
        for call in ("first", "second"):
            try:
                answer = await instance.resolve()
            except Exception as exc:  # a plugin's failure: report it in words
                problems.append(f"resolve() raised {type(exc).__name__}: {exc} ({call} call)")
                break
            try:
                _, bad = parse_answer(answer)
            except TypeError as exc:
                problems.append(f"{exc} ({call} call)")
                break
            problems += [f"resolve() returned a bad entry {line}" for line in bad]
            ttl = getattr(instance, "ttl", None)
            if ttl is not None and not (_is_number(ttl) and ttl >= 0):
                problems.append(f"its 'ttl' must be None or seconds, got {ttl!r}")
    finally:
        if aclose is not None:
            await aclose()
    return sorted(set(problems))


def _unknown_options(cls: type[Any], options: dict[str, Any]) -> list[str]:
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):  # no signature to read: construction will tell
        return []
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return []
    return [f"its constructor takes no option {k!r}" for k in options if k not in params]


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
