"""A FastAPI app with balancekit in front of some of its paths.

Run it (from this folder):

    uvicorn app:app --port 8000

Requests under /api/ are balanced over the backends in balancekit.toml;
every other path is this app's own.
"""

from __future__ import annotations

import os
from pathlib import Path

from fastapi import FastAPI

from balancekit.asgi import BalanceMiddleware

CONFIG = os.environ.get("BALANCEKIT_CONFIG", str(Path(__file__).with_name("balancekit.toml")))

app = FastAPI(title="balancekit example")


@app.get("/")
def home() -> dict[str, str]:
    return {"app": "fastapi example", "balanced": "/api/"}


app.add_middleware(BalanceMiddleware, config=CONFIG)
