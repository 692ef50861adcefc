"""A WSGI app (no framework) on the worker's own pool: counts visits in sqlite3."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from typing import Any

import pool


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    with pool.connection() as conn:
        conn.execute("INSERT INTO visits (pid) VALUES (?)", (os.getpid(),))
        (total,) = conn.execute("SELECT count(*) FROM visits").fetchone()
    body = json.dumps({"pid": os.getpid(), "visits": total, "pool": pool.size()}).encode()
    start_response("200 OK", [("content-type", "application/json"),
                              ("x-worker-pid", str(os.getpid()))])
    return [body]
