"""The app the multi-worker tests run under ``uvicorn --workers N``.

Its configuration is the TOML file named by ``$BALANCEKIT_CONFIG``; routed
paths go through balancekit, and two paths of its own let a test see and
steer one worker: ``GET /whoami`` (this worker's pid and pools) and
``POST /admin/OP?url=...`` (a runtime change made through this worker).
"""

from __future__ import annotations

import json
import os
from typing import Any
from urllib.parse import parse_qs

from balancekit import Balancer
from balancekit._types import Receive, Scope, Send
from balancekit.asgi import BalanceMiddleware

balancer = Balancer(os.environ["BALANCEKIT_CONFIG"])


async def _own(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return
    if scope["type"] != "http":
        return
    path = scope["path"]
    status = 404
    body: dict[str, Any] = {"error": "not found"}
    if path == "/whoami":
        status, body = 200, {"pid": os.getpid(), "status": balancer.status()}
    elif path.startswith("/admin/"):
        query = {k: v[0] for k, v in parse_qs(scope["query_string"].decode()).items()}
        pool = balancer.pools[query.get("pool", "api")]
        op = path.removeprefix("/admin/")
        if op == "weight":
            pool.set_weight(query["url"], int(query["weight"]))
        else:
            getattr(pool, op)(query["url"])
        status, body = 200, {"pid": os.getpid(), "done": op}
    payload = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json")]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


app = BalanceMiddleware(_own, balancer=balancer)
