"""What ``LoadReportMiddleware`` adds to a request, in one process.

    .venv/bin/python bench/load_report_bench.py                # 7 rounds, ~40 s
    .venv/bin/python bench/load_report_bench.py --quick        # 3 rounds of 5,000
    .venv/bin/python bench/load_report_bench.py --rounds 9 --requests 40000

Each app is called directly, as its server would call it, once bare and
once wrapped, the two interleaved round by round: ASGI apps with a fresh
scope and do-nothing ``receive``/``send`` awaited in one event loop, WSGI
apps with a fresh environ, their response iterated and closed, Django's
middleware with one request and its response closed (which runs its
closers, and ``request_finished``, as Django's handlers do). The apps are
a minimal one of each kind (the middleware's cost laid bare) and a
one-route Starlette, Flask and Django view (what an app costs anyway).

Reported: CPU microseconds per request (``time.process_time``), the
minimum and median of the rounds, what the middleware adds (by the
minimum) and the ratio of the two minimums.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from balancekit.load_report import LoadReportMiddleware  # noqa: E402

SCOPE = {
    "type": "http",
    "asgi": {"version": "3.0"},
    "http_version": "1.1",
    "method": "GET",
    "scheme": "http",
    "path": "/",
    "raw_path": b"/",
    "root_path": "",
    "query_string": b"",
    "headers": [(b"host", b"127.0.0.1"), (b"user-agent", b"bench")],
    "client": ("127.0.0.1", 50000),
    "server": ("127.0.0.1", 8000),
}
REQUEST = {"type": "http.request", "body": b"", "more_body": False}


async def receive() -> dict[str, Any]:
    return REQUEST


async def send(message: Any) -> None:
    pass


async def minimal_asgi(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def minimal_wsgi(environ: Any, start_response: Any) -> list[bytes]:
    start_response("200 OK", [("Content-Length", "2")])
    return [b"ok"]


def starlette_app() -> Any:
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    async def home(request: Any) -> PlainTextResponse:
        return PlainTextResponse("ok")

    return Starlette(routes=[Route("/", home)])


def flask_app() -> Any:
    from flask import Flask

    app = Flask("bench")
    app.add_url_rule("/", "home", lambda: "ok")
    return app.wsgi_app


def asgi_runner(app: Any) -> Callable[[int], float]:
    def run(requests: int) -> float:
        async def loop() -> float:
            started = time.process_time()
            for _ in range(requests):
                await app(dict(SCOPE), receive, send)
            return time.process_time() - started

        return asyncio.run(loop())

    return run


def wsgi_runner(app: Any) -> Callable[[int], float]:
    from werkzeug.test import EnvironBuilder

    environ = EnvironBuilder(path="/").get_environ()

    def start_response(status: str, headers: Any, exc_info: Any = None) -> None:
        pass

    def run(requests: int) -> float:
        started = time.process_time()
        for _ in range(requests):
            response = app(dict(environ), start_response)
            for _ in response:
                pass
            close = getattr(response, "close", None)
            if close is not None:
                close()
        return time.process_time() - started

    return run


def django_runners() -> tuple[Callable[[int], float], Callable[[int], float]]:
    """A one-view Django get_response, bare and under the middleware."""
    import django
    from django.conf import settings

    settings.configure(DEBUG=False, ALLOWED_HOSTS=["*"], SECRET_KEY="bench")
    django.setup()
    from django.http import HttpResponse
    from django.test import RequestFactory

    from balancekit_django.middleware import LoadReportMiddleware as DjangoMiddleware

    def view(request: Any) -> HttpResponse:
        return HttpResponse(b"ok")

    request = RequestFactory().get("/")
    wrapped = DjangoMiddleware(view)

    def runner(get_response: Callable[[Any], Any]) -> Callable[[int], float]:
        def run(requests: int) -> float:
            started = time.process_time()
            for _ in range(requests):
                get_response(request).close()
            return time.process_time() - started

        return run

    return runner(view), runner(wrapped)


def cases() -> list[tuple[str, Callable[[int], float], Callable[[int], float]]]:
    starlette = starlette_app()
    flask = flask_app()
    return [
        (
            "ASGI, minimal app",
            asgi_runner(minimal_asgi),
            asgi_runner(LoadReportMiddleware(minimal_asgi)),
        ),
        ("ASGI, Starlette", asgi_runner(starlette), asgi_runner(LoadReportMiddleware(starlette))),
        (
            "WSGI, minimal app",
            wsgi_runner(minimal_wsgi),
            wsgi_runner(LoadReportMiddleware(minimal_wsgi)),
        ),
        ("WSGI, Flask", wsgi_runner(flask), wsgi_runner(LoadReportMiddleware(flask))),
        ("Django, one view (sync)", *django_runners()),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--quick", action="store_true", help="3 rounds of 5,000 requests")
    args = parser.parse_args()
    rounds, requests = (3, 5_000) if args.quick else (args.rounds, args.requests)

    rows = []
    for label, bare, wrapped in cases():
        bare(requests // 10), wrapped(requests // 10)  # warm up, unmeasured
        samples: dict[str, list[float]] = {"bare": [], "with": []}
        for _ in range(rounds):
            for name, run in (("bare", bare), ("with", wrapped)):
                gc.collect()
                samples[name].append(run(requests) * 1e6 / requests)
        rows.append((label, samples["bare"], samples["with"]))

    print(
        f"\nLoadReportMiddleware, CPU us per request ({rounds} rounds of {requests:,}; "
        f"Python {sys.version.split()[0]})"
    )
    head = f"{'app':<26} {'bare min':>9} {'bare med':>9} {'with min':>9} {'with med':>9}"
    print(f"{head} {'adds':>7} {'ratio':>7}")
    for label, bare_us, with_us in rows:
        adds = min(with_us) - min(bare_us)
        ratio = min(with_us) / min(bare_us)
        print(
            f"{label:<26} {min(bare_us):>9.2f} {statistics.median(bare_us):>9.2f} "
            f"{min(with_us):>9.2f} {statistics.median(with_us):>9.2f} {adds:>+7.2f} {ratio:>6.2f}x"
        )


if __name__ == "__main__":
    main()
