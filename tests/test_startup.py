"""A bad configuration stops an ASGI app at start-up, not at its first request."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from tests.conftest import free_port

APP = """
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from balancekit.asgi import BalanceMiddleware


async def home(request):
    return PlainTextResponse("home")


app = Starlette(routes=[Route("/", home)])
app.add_middleware(BalanceMiddleware, config={CONFIG!r})
"""


def run_app(tmp_path: Path, config: dict) -> subprocess.CompletedProcess[str]:
    (tmp_path / "bad_app.py").write_text(textwrap.dedent(APP).replace("{CONFIG!r}", repr(config)))
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "bad_app:app",
            "--app-dir",
            str(tmp_path),
            "--port",
            str(free_port()),
            "--lifespan",
            "on",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_starlette_app_with_a_bad_config_fails_at_startup(tmp_path: Path) -> None:
    config = {"pools": {"api": {"backends": [{"url": "http://127.0.0.1:9", "weight": -3}]}}}
    result = run_app(tmp_path, config)
    assert result.returncode != 0
    assert "ConfigError" in result.stderr
    assert "pools.api.backends[0].weight: must be a positive integer, got -3" in result.stderr
    assert "Application startup failed" in result.stderr
