"""The page every Python peer serves: hello-cluster's own built-in app, imported, not copied.

Importing `hello_cluster.app` (PYTHONPATH=service) guarantees byte-identical responses and
identical per-request work, so differences measure the servers, not the apps. `wsgi_app` is
the same page for the gunicorn sync reference.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

from hello_cluster.app import BODY
from hello_cluster.app import app as app

__all__ = ["app", "wsgi_app"]


def wsgi_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    start_response("200 OK", [("Content-Type", "text/html; charset=utf-8"),
                              ("Content-Length", str(len(BODY))),
                              ("x-worker-pid", str(os.getpid()))])
    return [BODY]
