"""Test WSGI app (plain PEP 3333, no framework): shows what a view sees and how bodies flow."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs


def _seconds(environ: dict[str, Any]) -> float:
    return float(parse_qs(environ.get("QUERY_STRING", "")).get("s", ["1"])[0])


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    path = environ["PATH_INFO"]
    headers = [("content-type", "text/plain"), ("x-worker-pid", str(os.getpid()))]
    if path.startswith("/environ") or environ["QUERY_STRING"] == "environ":  # what it sees
        seen = {key: environ.get(key) for key in
                ("SCRIPT_NAME", "PATH_INFO", "REMOTE_ADDR", "QUERY_STRING", "wsgi.url_scheme")}
        seen["errors_is_stderr"] = environ["wsgi.errors"] is sys.stderr
        start_response("200 OK", headers)
        return [json.dumps(seen).encode()]
    if path == "/errors":  # wsgi.errors reaches the worker's stderr (the service log)
        environ["wsgi.errors"].write("hc_wsgiapp: a line on wsgi.errors\n")
        environ["wsgi.errors"].flush()
        start_response("200 OK", headers)
        return [b"written\n"]
    if path == "/echo":  # each chunk of wsgi.input is answered as soon as it is read
        start_response("200 OK", headers)
        return _echo(environ["wsgi.input"])
    if path == "/sleep":  # a blocking view: holds a thread of the pool, not the event loop
        time.sleep(_seconds(environ))
        start_response("200 OK", headers)
        return [f"slept in {threading.current_thread().name}\n".encode()]
    if path == "/boom":  # a view that raises before it answers
        raise RuntimeError("hc_wsgiapp: boom")
    if path == "/stream":  # n chunks of 64 KiB, made as fast as the server takes them
        count = int(parse_qs(environ["QUERY_STRING"]).get("n", ["16"])[0])
        start_response("200 OK", headers)
        return (b"x" * 65536 for _ in range(count))
    start_response("200 OK", headers)
    return [b"hello from wsgi\n"]


def _echo(body: Any) -> Iterable[bytes]:
    while True:
        line = body.readline()
        if not line:
            return
        yield b"got " + line
