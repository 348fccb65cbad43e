"""A Flask app with balancekit in front of some of its paths.

Run it (from this folder), as in production, under gunicorn:

    gunicorn --workers 2 --threads 8 --bind 127.0.0.1:8000 "app:create_app()"

or with Flask's development server: ``flask --app app run``.

- ``/api/`` is balanced by the configuration's route (balancekit.toml);
- ``/search/`` is a ``kit.proxy`` view on a blueprint that asks for a token,
  so Flask's own hooks guard a proxied path;
- ``/workers`` is this app's own view: which worker answered and what its
  pools look like (every worker runs its own health checks);
- ``flask --app app balancekit status`` prints the pools.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from flask import Blueprint, Flask, abort, request

from balancekit_flask import BalanceKit

CONFIG = os.environ.get("BALANCEKIT_CONFIG", str(Path(__file__).with_name("balancekit.toml")))
SEARCH_TOKEN = os.environ.get("SEARCH_TOKEN", "let-me-search")

kit = BalanceKit()
search = Blueprint("search", __name__, url_prefix="/search")
kit.proxy("/", pool="search", strip_prefix=True, blueprint=search)


@search.before_request
def require_token() -> None:
    if request.headers.get("X-Search-Token") != SEARCH_TOKEN:
        abort(401)


def create_app() -> Flask:
    app = Flask(__name__)
    app.config["SECRET_KEY"] = os.environ.get("SECRET_KEY", "dev-only-secret")
    app.config["BALANCEKIT"] = CONFIG
    kit.init_app(app)
    app.register_blueprint(search)

    @app.get("/")
    def home() -> dict[str, str]:
        return {"app": "flask example", "balanced": "/api/", "proxied view": "/search/"}

    @app.get("/workers")
    def workers() -> dict[str, Any]:
        return {"pid": os.getpid(), "status": kit.balancer.status()}

    return app
